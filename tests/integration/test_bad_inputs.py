"""Bad inputs refused before any work, with a message that names the bad value and the fix (issue #32):
loss targets and weights, attention masks, resuming a fork with another run's inputs, config.json
fields, metric tokens given as text, and `diffusionlens patch` specs (exit code 2, one line, before
the model loads)."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from tolerance import logit_metric_atol
from torch.nn import functional as F

from diffusionlens import HookedDiffusionGemma, ReplayNoise
from diffusionlens.cli import main
from diffusionlens.config import DiffusionGemmaConfig
from diffusionlens.losses import IGNORE_INDEX, denoising_loss
from diffusionlens.patching import LogitDiff, TargetProb, patch_sweep, record_run
from diffusionlens.patching.runs import fork_state, run_patched
from diffusionlens.patching.sweep_spec import MAX_AXIS_LABELS, SpecError, SweepSpec
from diffusionlens.weights.checkpoint import SHIPPED_CHECKPOINTS
from diffusionlens.weights.device_map import DeviceMapError

PROMPT = "squares 400 800:"


@pytest.fixture
def no_work(toy):
    """Counts the encoder passes run while it is active: a refused call must run none."""
    fired = []
    toy.add_hook("encoder.hook_embed", lambda value, hook: fired.append(hook.name))
    yield fired
    toy.reset_hooks()


def _inputs(toy):
    ids = toy.to_tokens(PROMPT)
    canvas = torch.randint(
        3, toy.cfg.vocab_size, (1, toy.cfg.canvas_length), generator=torch.Generator().manual_seed(0)
    )
    return ids, canvas


# ---------------------------------------------------------------------- losses
def test_ignore_index_targets_are_left_out_of_the_mean_as_in_torch(toy):
    ids, canvas = _inputs(toy)
    targets = canvas.clone()
    targets[0, 5:20] = IGNORE_INDEX
    with torch.no_grad():
        logits = toy(ids, canvas)
        loss = toy(ids, canvas, return_type="loss", targets=targets)
    # torch's own mean with ignore_index=-100, the semantics transformers' losses use
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(loss, expected)
    counted = targets[0] != IGNORE_INDEX
    kept = F.cross_entropy(logits[0][counted], targets[0][counted])
    torch.testing.assert_close(loss, kept)
    # with a mask and weights the ignored positions still do not count
    weights = torch.rand(targets.shape, generator=torch.Generator().manual_seed(1))
    weighted = denoising_loss(logits, targets, weights=weights)
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none", ignore_index=-100)
    keep = (targets != -100).flatten().float()
    torch.testing.assert_close(weighted, (ce * weights.flatten() * keep).sum() / (weights.flatten() * keep).sum())


def test_loss_without_ignored_targets_is_unchanged(toy):
    ids, canvas = _inputs(toy)
    targets = canvas.clone()
    with torch.no_grad():
        logits = toy(ids, canvas)
        loss = toy(ids, canvas, return_type="loss", targets=targets)
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    weight = (targets != toy.cfg.pad_token_id).flatten().float()
    assert torch.equal(loss, (ce * weight).sum() / weight.sum())


BAD_TARGETS = {
    "id equal to the vocab size": (lambda t, v: t.index_fill_(1, torch.tensor([3]), v), ValueError, r"= 44 .*44 ids"),
    "id far past the vocab": (lambda t, v: t.index_fill_(1, torch.tensor([0]), 10_000), ValueError, r"10000.*44 ids"),
    "negative id -1": (lambda t, v: t.index_fill_(1, torch.tensor([7]), -1), ValueError, r"\[0, 7\] = -1 .*-100"),
    "negative id -99": (lambda t, v: t.index_fill_(1, torch.tensor([2]), -99), ValueError, r"= -99 .*-100"),
    "float targets": (lambda t, v: t.float(), TypeError, "integer tensor of token ids"),
    "wrong shape": (lambda t, v: t[:, :10], ValueError, r"expected \(1, 48\)"),
}


@pytest.mark.without_shape_checks  # the library's own message, as users (who run unchecked) meet it
@pytest.mark.parametrize("case", sorted(BAD_TARGETS))
def test_bad_targets_are_refused_before_the_pass(toy, no_work, case):
    change, error, message = BAD_TARGETS[case]
    ids, canvas = _inputs(toy)
    with pytest.raises(error, match=message):
        toy(ids, canvas, return_type="loss", targets=change(canvas.clone(), toy.cfg.vocab_size))
    assert no_work == []


NOTHING_COUNTS = {
    "every target ignored": ({"targets": "ignored"}, "every target is -100"),
    "every target padding": ({"targets": "pad"}, r"every target is padding \(pad_token_id=0\)"),
    "empty loss_mask": ({"loss_mask": "none"}, "loss_mask has no True entry"),
    "zero weights": ({"loss_weights": "zero"}, "loss_weights are 0 at every position"),
}


@pytest.mark.parametrize("case", sorted(NOTHING_COUNTS))
def test_a_loss_where_nothing_counts_says_why(toy, case):
    spec, message = NOTHING_COUNTS[case]
    ids, canvas = _inputs(toy)
    kwargs = {"targets": canvas.clone()}
    if spec.get("targets") == "ignored":
        kwargs["targets"] = torch.full_like(canvas, IGNORE_INDEX)
    if spec.get("targets") == "pad":
        kwargs["targets"] = torch.zeros_like(canvas)
    if "loss_mask" in spec:
        kwargs["loss_mask"] = torch.zeros(canvas.shape, dtype=torch.bool)
    if "loss_weights" in spec:
        kwargs["loss_weights"] = torch.zeros(canvas.shape)
    with pytest.raises(ValueError, match=message):
        toy(ids, canvas, return_type="loss", **kwargs)


@pytest.mark.without_shape_checks  # the library's own message, as users (who run unchecked) meet it
@pytest.mark.parametrize(
    ("weights", "message"),
    [
        (-torch.ones(1, 48), r"loss_weights\[0, 0\] = -1.0: weights must be finite and >= 0"),
        (torch.ones(1, 48).index_fill_(1, torch.tensor([9]), -0.5), r"loss_weights\[0, 9\] = -0.5"),
        (torch.ones(1, 48).index_fill_(1, torch.tensor([4]), float("nan")), r"loss_weights\[0, 4\] = nan"),
        (torch.ones(1, 48, dtype=torch.long), "float tensor"),
        (torch.ones(1, 47), r"expected \(1, 48\)"),
    ],
    ids=["all negative", "one negative", "nan", "integer", "wrong shape"],
)
def test_bad_loss_weights_are_refused_before_the_pass(toy, no_work, weights, message):
    ids, canvas = _inputs(toy)
    with pytest.raises((ValueError, TypeError), match=message):
        toy(ids, canvas, return_type="loss", targets=canvas, loss_weights=weights)
    assert no_work == []
    assert "padding" not in message


# ---------------------------------------------------------------------- attention masks
BAD_MASKS = {
    "value 2": (lambda m: m.index_fill_(1, torch.tensor([3]), 2), ValueError, r"attention_mask\[0, 3\] = 2.*only 1"),
    "value -1": (lambda m: m.index_fill_(1, torch.tensor([0]), -1), ValueError, r"attention_mask\[0, 0\] = -1"),
    "float values": (lambda m: m.float(), TypeError, "bool or integer 0/1, got torch.float32"),
    "wrong shape": (lambda m: m[:, 1:], ValueError, r"shape \(1, 16\) but input_ids has \(1, 17\)"),
    "all-zero row": (lambda m: torch.zeros_like(m), ValueError, "row 0 is all 0"),
    "a list": (lambda m: m.tolist(), TypeError, "must be a tensor"),
    "right padding": (
        lambda m: m.index_fill_(1, torch.tensor([14, 15, 16]), 0),
        ValueError,
        r"row 0 has padding \(0\) after a token \(1\) at position 14.*left-padded.*to_tokens_and_mask",
    ),
    "padding between tokens": (
        lambda m: m.index_fill_(1, torch.tensor([5]), 0),
        ValueError,
        r"row 0 has padding \(0\) after a token \(1\) at position 5.*left-padded",
    ),
}
ENTRY_POINTS = {
    "generate": lambda model, ids, mask: model.generate(ids, attention_mask=mask, max_new_tokens=48, progress=False),
    "generate_with_cache": lambda model, ids, mask: model.generate_with_cache(
        ids, attention_mask=mask, names_filter="decoder.hook_logits", max_new_tokens=48, progress=False
    ),
    "forward": lambda model, ids, mask: model(ids, torch.zeros(1, 48, dtype=torch.long), attention_mask=mask),
    "run_with_cache": lambda model, ids, mask: model.run_with_cache(
        ids, torch.zeros(1, 48, dtype=torch.long), attention_mask=mask
    ),
}


@pytest.mark.without_shape_checks  # the library's own message, as users (who run unchecked) meet it
@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("case", sorted(BAD_MASKS))
def test_bad_attention_masks_are_refused_before_any_work(toy, no_work, entry, case):
    change, error, message = BAD_MASKS[case]
    ids = toy.to_tokens(PROMPT)
    mask = change(torch.ones_like(ids))
    with pytest.raises(error, match=message):
        ENTRY_POINTS[entry](toy, ids, mask)
    assert no_work == []


def test_a_disk_cache_is_not_started_for_a_bad_mask(toy, tmp_path):
    ids = toy.to_tokens(PROMPT)
    with pytest.raises(ValueError, match="= 2"):
        toy.generate_with_cache(ids, attention_mask=torch.full_like(ids, 2), storage="disk", path=tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_good_masks_of_every_kind_give_the_same_generation(toy):
    ids = toy.to_tokens(PROMPT)
    runs = [
        toy.generate(ids, attention_mask=mask, max_new_tokens=48, noise=ReplayNoise(0), progress=False).sequences
        for mask in (None, torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool))
    ]
    assert all(torch.equal(r, runs[0]) for r in runs)


def test_a_right_padded_prompt_refused_and_re_padded_left_gives_the_unpadded_answer(toy):
    # right padding puts pads between the prompt and the canvas: it gave another answer, silently
    ids = toy.to_tokens(PROMPT)
    pad = torch.full((1, 3), toy.tokenizer.pad_token_id)
    right, right_mask = torch.cat([ids, pad], 1), torch.cat([torch.ones_like(ids), torch.zeros_like(pad)], 1)
    with pytest.raises(ValueError, match="left-padded"):
        toy.generate(right, attention_mask=right_mask, max_new_tokens=48, progress=False)
    left = torch.cat([pad, ids], 1)
    left_mask = torch.cat([torch.zeros_like(pad), torch.ones_like(ids)], 1)
    run = dict(max_new_tokens=48, noise=ReplayNoise(0), progress=False)
    padded = toy.generate(left, attention_mask=left_mask, **run)
    # masked left padding shifts every position alike (RoPE is relative): the same tokens
    assert torch.equal(padded.new_tokens(), toy.generate(ids, **run).new_tokens())
    # the fix the message names: a right-padded batch re-padded on the left
    batch, batch_mask = toy.to_tokens_and_mask([PROMPT, "sort 1 2:"], padding_side="right")
    with pytest.raises(ValueError, match="row 1 has padding"):
        toy.generate(batch, attention_mask=batch_mask, max_new_tokens=48, progress=False)
    batch, batch_mask = toy.to_tokens_and_mask({"input_ids": batch, "attention_mask": batch_mask})
    assert batch_mask[1, 0] == 0 and batch_mask[1, -1] == 1
    toy.generate(batch, attention_mask=batch_mask, max_new_tokens=48, progress=False)


def test_the_causal_twin_takes_right_padding():
    # a causal stack never lets a token see the padding after it (training batches are right-padded), so
    # right padding stays allowed there: the real tokens' logits equal the unpadded run's
    from diffusionlens.causal_lm import HookedGemma4CausalLM

    twin = HookedGemma4CausalLM.from_pretrained("toy-ar", progress=False)
    ids = twin.to_tokens(PROMPT)
    padded = torch.cat([ids, torch.full((1, 2), twin.tokenizer.pad_token_id)], 1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros(1, 2, dtype=torch.long)], 1)
    n = ids.shape[1]
    # two more positions: other matmul shapes, so the path's tolerance
    atol = logit_metric_atol(twin, terms=1)
    torch.testing.assert_close(twin(padded, attention_mask=mask)[:, :n], twin(ids), atol=atol, rtol=0)


# ---------------------------------------------------------------------- resume
@pytest.fixture(scope="module")
def base(toy):
    return record_run(toy, toy.to_tokens(PROMPT), max_new_tokens=48, max_denoising_steps=12)


@pytest.fixture(scope="module")
def fork(toy, base):
    return fork_state(toy, base, 1)


def test_a_fork_resumes_with_its_own_run(toy, base, fork):
    resumed = toy.generate(base.input_ids, resume=fork, **base.generate_kwargs)
    regenerated = run_patched(toy, base, [], mode="free")
    assert torch.equal(resumed.sequences, regenerated.sequences)


RESUME_CASES = {
    "another prompt": ({"prompt": "squares 600 800:"}, "another prompt"),
    "another batch": ({"prompt": [PROMPT, PROMPT]}, r"shape \(1, 17\).*\(2, 17\)"),
    "a longer prompt": ({"prompt": "squares 4000 800:"}, r"shape \(1, 17\).*\(1, 18\)"),
    "another attention mask": ({"mask": "left pad"}, "another attention_mask"),
    "other max_denoising_steps": ({"max_denoising_steps": 10}, "max_denoising_steps: forked run 12, this call 10"),
    "other entropy_bound": ({"entropy_bound": 0.5}, "entropy_bound: forked run 0.1, this call 0.5"),
    "other noise seed": ({"noise": ReplayNoise(1)}, r"noise: forked run 'ReplayNoise\(seed=0\)'"),
    "other max_new_tokens": ({"max_new_tokens": 96}, "max_new_tokens: forked run 48, this call 96"),
}


@pytest.mark.parametrize("entry", ["generate", "generate_with_cache"])
@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resuming_a_fork_in_another_run_is_refused(toy, base, fork, no_work, tmp_path, case, entry):
    change, message = RESUME_CASES[case]
    change = dict(change)
    kwargs = {**base.generate_kwargs}
    ids = base.input_ids
    if "prompt" in change:
        ids = toy.to_tokens(change.pop("prompt"))
    if change.pop("mask", None):
        kwargs["attention_mask"] = torch.ones_like(ids).index_fill_(1, torch.tensor([0]), 0)
    kwargs.update(change)
    with pytest.raises(ValueError, match=message) as error:
        if entry == "generate":
            toy.generate(ids, resume=fork, **kwargs)
        else:
            toy.generate_with_cache(ids, resume=fork, storage="disk", path=tmp_path / "c", **kwargs)
    assert "forked from" in str(error.value)
    assert no_work == []
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------------- config.json
TOY_CONFIG = json.loads((SHIPPED_CHECKPOINTS["toy"] / "config.json").read_text())
BAD_CONFIG = {
    "hidden_size as a string": (("text_config", "hidden_size"), "192", "hidden_size must be a positive integer"),
    "num_hidden_layers as a string": (("text_config", "num_hidden_layers"), "6", "num_hidden_layers must be"),
    "zero num_key_value_heads": (("text_config", "num_key_value_heads"), 0, "num_key_value_heads must be a positive"),
    "zero head_dim": (("text_config", "head_dim"), 0, "head_dim must be a positive integer, got 0"),
    "zero vocab_size": (("text_config", "vocab_size"), 0, "vocab_size must be a positive integer, got 0"),
    "zero canvas_length": (("canvas_length",), 0, "canvas_length must be a positive integer, got 0"),
    "canvas_length as a string": (("canvas_length",), "48", "canvas_length must be a positive integer, got '48'"),
    "rms_norm_eps as a string": (("text_config", "rms_norm_eps"), "1e-6", "rms_norm_eps must be a positive number"),
    "zero softcap": (("text_config", "final_logit_softcapping"), 0, "final_logit_softcapping must be a positive"),
    "rope_theta as a string": (
        ("text_config", "rope_parameters", "full_attention", "rope_theta"),
        "1e6",
        "rope_parameters.full_attention.rope_theta must be a number",
    ),
    "eos id as a string": (("text_config", "eos_token_id"), "1", "eos_token_id must be a token id"),
    "boolean sliding_window": (("text_config", "sliding_window"), True, "sliding_window must be a positive integer"),
}


def _bad_config(case):
    path, value, _ = BAD_CONFIG[case]
    config = copy.deepcopy(TOY_CONFIG)
    target = config
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return config


@pytest.mark.parametrize("case", sorted(BAD_CONFIG))
def test_a_bad_config_field_is_named(case):
    with pytest.raises(ValueError, match=BAD_CONFIG[case][2]):
        DiffusionGemmaConfig.from_hf(_bad_config(case))


def test_a_bad_config_json_is_refused_before_the_weights_are_read(tmp_path, monkeypatch):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(SHIPPED_CHECKPOINTS["toy"], checkpoint)
    (checkpoint / "config.json").write_text(json.dumps(_bad_config("zero num_key_value_heads")))
    import diffusionlens.weights.checkpoint as loading

    monkeypatch.setattr(loading, "iter_safetensors", lambda *a, **k: pytest.fail("weights read"))
    with pytest.raises(ValueError, match="num_key_value_heads must be a positive integer, got 0"):
        HookedDiffusionGemma.from_pretrained(checkpoint, progress=False)


# ---------------------------------------------------------------------- metrics with token text
@pytest.fixture(scope="module")
def runs(toy):
    clean = record_run(toy, toy.to_tokens(PROMPT), names_filter="decoder.blocks.2.hook_resid_pre", max_new_tokens=48)
    corrupted = record_run(toy, toy.to_tokens("squares 600 800:"), max_new_tokens=48)
    return clean, corrupted


@pytest.mark.parametrize(
    ("text_metric", "id_metric"),
    [
        (LogitDiff(0, "8", "7"), lambda t: LogitDiff(0, t.to_single_token("8"), t.to_single_token("7"))),
        (LogitDiff(1, "8", 11), lambda t: LogitDiff(1, t.to_single_token("8"), 11)),
        (TargetProb(0, "8"), lambda t: TargetProb(0, t.to_single_token("8"))),
    ],
    ids=["logit_diff text", "logit_diff text and id", "target_prob text"],
)
def test_metric_tokens_as_text_give_the_same_sweep_as_ids(toy, runs, text_metric, id_metric):
    clean, corrupted = runs
    kwargs = dict(layers=[2], positions=range(2), progress=False)
    hook = "decoder.blocks.{layer}.hook_resid_pre"
    by_text = patch_sweep(toy, clean, corrupted, hook, ("layer", "position"), text_metric, **kwargs)
    by_id = patch_sweep(toy, clean, corrupted, hook, ("layer", "position"), id_metric(toy), **kwargs)
    assert torch.equal(by_text.values, by_id.values)
    assert text_metric.with_token_ids(toy) == id_metric(toy)


def test_a_metric_with_token_text_called_without_a_model_says_how(runs):
    with pytest.raises(TypeError, match=r"with_token_ids\(model\)"):
        LogitDiff(0, "8", "7")(runs[0])


@pytest.mark.without_shape_checks  # the library's own message, as users (who run unchecked) meet it
@pytest.mark.parametrize(
    ("metric", "error", "message"),
    [
        (LogitDiff(0, "84", "7"), ValueError, r"LogitDiff\(good='84'\): '84' is 2 tokens"),
        (LogitDiff(0, 8, 44), ValueError, r"LogitDiff\(bad=44\) is outside the vocabulary \[0, 44\)"),
        (TargetProb(0, -1), ValueError, r"TargetProb\(token=-1\) is outside the vocabulary"),
        (LogitDiff(0, 8.0, 7), TypeError, "give a token id"),
    ],
    ids=["two tokens", "id past the vocab", "negative id", "float id"],
)
def test_bad_metric_tokens_are_refused_before_the_sweep(toy, runs, no_work, metric, error, message):
    clean, corrupted = runs
    with pytest.raises(error, match=message):
        patch_sweep(toy, clean, corrupted, "decoder.blocks.2.hook_resid_pre", ("step", "position"), metric)
    assert no_work == []


@pytest.mark.parametrize("mode", ["frozen", "free"])
@pytest.mark.parametrize("steps", [[0, 5], [-1], [0.5]], ids=["past the run", "negative", "not an int"])
def test_sweep_steps_outside_the_run_are_refused_before_the_sweep(toy, runs, no_work, mode, steps):
    """A frozen re-run has no recorded step there (it was a raw IndexError) and a free cell cannot fork there."""
    clean, corrupted = runs
    n = corrupted.trace.steps(0)
    with pytest.raises(ValueError, match=rf"outside the corrupted run's first canvas, which ran steps 0\.\.{n - 1}"):
        patch_sweep(
            toy,
            clean,
            corrupted,
            "decoder.blocks.{layer}.hook_resid_pre",
            ("layer", "step"),
            LogitDiff(0, 8, 7),
            steps=[*steps[:-1], n + 3] if steps == [0, 5] else steps,
            mode=mode,
            progress=False,
        )
    assert no_work == []


def test_a_metric_with_token_text_on_a_model_without_a_tokenizer_is_refused(toy):
    bare = HookedDiffusionGemma.from_config(toy.cfg)
    with pytest.raises(ValueError, match="no tokenizer"):
        LogitDiff(0, "8", "7").with_token_ids(bare)


# ---------------------------------------------------------------------- the patch command
SPEC = {
    "clean": PROMPT,
    "corrupted": "squares 600 800:",
    "hook": "decoder.blocks.{layer}.hook_resid_pre",
    "over": ["layer", "position"],
    "layers": [0, 2],
    "positions": {"start": 0, "stop": 3},
    "metric": {"kind": "logit_diff", "position": 0, "good": "8", "bad": "4"},
}
DROP = object()
# name: (changes to SPEC, or the file's raw text), words the one-line message must hold
BAD_SPECS = {
    "malformed yaml": ("clean: [unclosed\nhook: x", "not valid YAML (line"),
    "malformed json": ('{"clean": "a",', "not valid JSON"),
    "a list, not a mapping": ("- a\n- b", "a mapping of keys to values, got list"),
    "unknown key": ({"hooks": "x"}, "unknown keys ['hooks']"),
    "missing metric": ({"metric": DROP}, "missing ['metric']"),
    "metric as a string": ({"metric": "logit_diff"}, "metric must be a mapping"),
    "metric kind unknown": ({"metric": {"kind": "accuracy"}}, "metric kind 'accuracy'"),
    "metric key unknown": ({"metric": {**SPEC["metric"], "postion": 1}}, "not ['postion']"),
    "metric key missing": ({"metric": {"kind": "logit_diff", "good": "8", "bad": "4"}}, "needs ['position']"),
    "metric position a string": ({"metric": {**SPEC["metric"], "position": "0"}}, "position must be an integer"),
    "metric token a list": ({"metric": {**SPEC["metric"], "good": [8]}}, "good must be a token's text or its id"),
    "metric position out of range": ({"metric": {**SPEC["metric"], "position": 48}}, "48 positions, 0..47"),
    "metric step out of range": ({"metric": {**SPEC["metric"], "step": 48}}, "metric step 48 is out of range"),
    "metric canvas out of range": ({"metric": {**SPEC["metric"], "canvas": 1}}, "write 1 canvas(es)"),
    "metric token two tokens": ({"metric": {**SPEC["metric"], "good": "84"}}, "'84' is 2 tokens"),
    "metric token id past vocab": ({"metric": {**SPEC["metric"], "bad": 44}}, "44 is outside the vocabulary"),
    "over one axis": ({"over": ["step"]}, "'over' needs two axes"),
    "over unknown axes": ({"over": ["position", "layer"]}, "is not a sweep"),
    "clean not a string": ({"clean": 7}, "clean must be a non-empty string"),
    "huge range": ({"positions": {"start": 0, "stop": 10**12}}, "positions has 1,000,000,000,000 values"),
    "range with a float": ({"positions": {"start": 0, "stop": 2.5}}, "integer start, stop"),
    "range keys wrong": ({"positions": {"begin": 0}}, "as a range is"),
    "positions out of range": ({"positions": [0, 48]}, "positions [48] out of range"),
    "negative positions": ({"positions": [-1]}, "positions must be >= 0"),
    "positions as strings": ({"positions": ["0", "1"]}, "positions must be an integer, a list"),
    "duplicate positions": ({"positions": [1, 1]}, "lists a value twice"),
    "empty range": ({"positions": {"start": 3, "stop": 3}}, "positions is empty"),
    "layers out of range": ({"layers": [0, 6]}, "layers [6] out of range: the model has 6"),
    "steps out of range": (
        {"over": ["step", "position"], "layers": [2], "steps": [0, 48]},
        "steps [48] out of range: the model has 48",
    ),
    "steps on a layer sweep": ({"steps": [0, 1]}, "steps is given but the sweep is over ['layer', 'position']"),
    "layer hook without a layer": ({"over": ["step", "position"], "layers": DROP}, "give the one layer"),
    "layer sweep without {layer}": ({"hook": "decoder.hook_embed"}, "needs '{layer}' in the hook"),
    "hook typo": ({"hook": "decoder.blocks.{layer}.hook_resid_pr"}, "hook 'decoder.blocks.0.hook_resid_pr'"),
    "mode unknown": ({"mode": "freeze"}, "mode='freeze'; choose one of ['frozen', 'free']"),
    "path unknown": ({"path": "slow"}, "path='slow'"),
    "seed a string": ({"seed": "0"}, "seed must be an integer"),
    "zero max_new_tokens": ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
    "batch_size a float": ({"batch_size": 1.5}, "batch_size must be a positive integer"),
    "metric_steps cell on a layer sweep": ({"metric_steps": "cell"}, "metric_steps 'cell' needs a frozen sweep"),
    "metric_steps strings": ({"metric_steps": ["1"]}, "metric_steps must be 'cell'"),
    "metric_steps out of range": ({"metric_steps": [50]}, "metric_steps [50] out of range"),
    "model not a checkpoint": ({"model": "."}, "is not a checkpoint directory"),
}


def _write_spec(tmp_path, case) -> str:
    change, _ = BAD_SPECS[case]
    if isinstance(change, str):
        path = tmp_path / ("spec.json" if change.startswith("{") else "spec.yaml")
        path.write_text(change)
        return str(path)
    spec = {k: v for k, v in {**SPEC, **change}.items() if v is not DROP}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return str(path)


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_a_bad_patch_spec_exits_2_with_one_line_before_the_model_loads(tmp_path, monkeypatch, capsys, case):
    monkeypatch.setattr(HookedDiffusionGemma, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(SystemExit) as exit_info:
        main(["patch", _write_spec(tmp_path, case), "--out", str(tmp_path / "out"), "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("diffusionlens patch: ")
    assert BAD_SPECS[case][1] in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_missing_spec_file_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["patch", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "No such file" in capsys.readouterr().err


def test_steps_the_runs_did_not_reach_are_refused_before_patching(toy, tmp_path, monkeypatch, capsys):
    import diffusionlens.patching.sweep_spec as sweep_spec

    monkeypatch.setattr(HookedDiffusionGemma, "from_pretrained", lambda *a, **k: toy)
    monkeypatch.setattr(sweep_spec, "sweep_recorded_spec", lambda *a, **k: pytest.fail("sweep started"))
    clean = record_run(toy, toy.to_tokens(PROMPT), noise=ReplayNoise(0), max_new_tokens=48)
    corrupted = record_run(toy, toy.to_tokens(SPEC["corrupted"]), noise=ReplayNoise(0), max_new_tokens=48)
    ran = min(clean.trace.steps(0), corrupted.trace.steps(0))
    assert ran < 47
    spec = {**SPEC, "over": ["step", "position"], "layers": [2], "steps": [0, 47]}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(SystemExit) as exit_info:
        main(["patch", str(path), "--out", str(tmp_path / "out"), "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and f"steps [47] were not run: the clean and corrupted runs both ran steps 0..{ran - 1}" in err
    )


def test_the_spec_checks_accept_the_documented_step_sweep():
    """The example of `diffusionlens patch --help`: a step × position sweep of one layer."""
    spec = SweepSpec.from_dict(
        {
            **SPEC,
            "over": ["step", "position"],
            "layers": [2],
            "positions": {"start": 0, "stop": 12},
            "metric_steps": "cell",
        }
    )
    assert spec.layers == [2] and spec.positions == list(range(12))
    assert MAX_AXIS_LABELS < 10**12
    with pytest.raises(SpecError):
        SweepSpec.from_dict({**SPEC, "positions": {"start": 0, "stop": MAX_AXIS_LABELS + 1}})


# ---------------------------------------------------------------------- devices
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"device_map": {"": "cuda:99"}}, r"device_map names \['cuda:99'\], which this machine does not have"),
        ({"device_map": {"": "cpu", "decoder.blocks.1": "cuda:99"}}, r"does not have \(visible: \['cpu'"),
        ({"device": "cuda:99"}, r"device names \['cuda:99'\], which this machine does not have"),
        ({"device_map": {"": "gpu7"}}, r"device_map names 'gpu7', which is not a device"),
    ],
    ids=["whole model", "one block", "device=", "not a device"],
)
def test_devices_the_machine_lacks_are_refused_before_loading(monkeypatch, kwargs, message):
    """torch failed mid-load with `AssertionError: Torch not compiled with CUDA enabled`."""
    from diffusionlens.weights import checkpoint

    opened = []
    safe_open = checkpoint.safe_open
    monkeypatch.setattr(checkpoint, "safe_open", lambda *a, **k: opened.append(a) or safe_open(*a, **k))
    with pytest.raises(DeviceMapError, match=message):
        HookedDiffusionGemma.from_pretrained("toy", progress=False, **kwargs)
    assert opened == []  # refused before any shard was opened
