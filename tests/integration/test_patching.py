"""Activation patching: identity, restoration, causality across steps, cross-step, channels, sweeps."""

from __future__ import annotations

import pytest
import torch
from reference import CANVAS, build_pair
from tolerance import logit_metric_atol

from diffusionlens.patching import (
    CrossStep,
    LogitDiff,
    Normalized,
    Patch,
    attribution_patch,
    channel_patches,
    patch_sweep,
    record_run,
    run_patched,
)
from diffusionlens.sampling.settings import GenerationSettings

GEN = dict(max_new_tokens=CANVAS["mixed"] * 2, max_denoising_steps=6, eos_token_id=None)


@pytest.fixture(scope="module")
def model():
    return build_pair("mixed", seed=4)[1]


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(3)
    clean = torch.randint(3, 97, (2, 9), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2:5] = torch.randint(3, 97, (2, 3), generator=g)
    return clean, corrupted


def _patchable(model) -> list[str]:
    # Replacing an attention pattern, even by an equal tensor, recomputes attention explicitly
    # (not bit-identical to the fused kernel), so identity checks leave those two hooks out.
    return [n for n in model.hook_dict if not n.endswith(("hook_attn_scores", "hook_pattern"))]


def test_identity_patch_reproduces_the_run_in_both_modes(model, prompts):
    clean_ids, _ = prompts
    names = _patchable(model)
    clean = record_run(model, clean_ids, names_filter=names, **GEN)
    patches = [Patch(name, clean.cache) for name in names]
    free = run_patched(model, clean, patches, mode="free")
    assert torch.equal(free.sequences, clean.sequences)
    assert all(torch.equal(free.logits[k], v) for k, v in clean.logits.items())
    for canvas in (0, 1):
        frozen = run_patched(model, clean, patches, mode="frozen", canvas=canvas)
        assert frozen.steps(canvas) == clean.steps(canvas)
        assert all(torch.equal(frozen.logits[(canvas, s)], clean.logits[(canvas, s)]) for s in frozen.steps(canvas))


def test_restoring_the_prompt_embedding_restores_the_generation(model, prompts):
    clean_ids, corrupted_ids = prompts
    clean = record_run(model, clean_ids, names_filter="encoder.blocks.0.hook_resid_pre", **GEN)
    corrupted = record_run(model, corrupted_ids, **GEN)
    prompt_len = clean_ids.shape[1]
    assert not torch.equal(corrupted.sequences[:, prompt_len:], clean.sequences[:, prompt_len:])
    restored = run_patched(model, corrupted, Patch("encoder.blocks.0.hook_resid_pre", clean.cache))
    assert torch.equal(restored.sequences[:, prompt_len:], clean.sequences[:, prompt_len:])


def test_a_patch_at_step_s_leaves_earlier_steps_unchanged(model, prompts):
    clean_ids, _ = prompts
    base = record_run(model, clean_ids, **GEN)
    ablate = Patch("decoder.blocks.1.hook_resid_post", lambda v, h: torch.zeros_like(v), steps=3)
    patched = run_patched(model, base, ablate)
    for field in ("input_canvas", "argmax", "sampled", "accepted"):
        assert torch.equal(getattr(patched.trace[0], field)[:3], getattr(base.trace[0], field)[:3]), field
    for step in range(3):
        assert torch.equal(patched.logits[(0, step)], base.logits[(0, step)])
    assert not torch.equal(patched.logits[(0, 3)], base.logits[(0, 3)])


def test_cross_step_patch_writes_the_source_steps_values(model, prompts):
    clean_ids, _ = prompts
    name = "decoder.blocks.2.hook_resid_post"
    base = record_run(model, clean_ids, **GEN)
    patch = Patch(name, CrossStep(1), steps=[4], positions=[0, 5])
    patched = run_patched(model, base, patch, names_filter=name)
    at_source = patched.cache.get(name, step=1)
    at_target = patched.cache.get(name, step=4)
    assert torch.equal(at_target[:, [0, 5]], at_source[:, [0, 5]])
    assert not torch.equal(at_target[:, [1, 2]], at_source[:, [1, 2]])
    with pytest.raises(ValueError, match="source step must come first"):
        run_patched(model, base, Patch(name, CrossStep(4), steps=[2]))


def test_channels_split_tokens_from_self_conditioning(model, prompts):
    clean_ids, corrupted_ids = prompts
    names = [
        h
        for c in ("tokens", "self_cond", "prompt")
        for h in model.resolve_hook_names(
            {
                "tokens": "sampler.hook_canvas_next",
                "self_cond": "decoder.self_cond.hook_logits_in",
                "prompt": ["encoder.blocks.*.attn.hook_rot_k", "encoder.blocks.*.attn.hook_v"],
            }[c]
        )
    ]
    clean = record_run(model, clean_ids, names_filter=names, **GEN)
    corrupted = record_run(model, corrupted_ids, **GEN)
    everything = [p for c in ("tokens", "self_cond", "prompt") for p in channel_patches(c, clean.cache)]
    restored = run_patched(model, corrupted, everything)
    assert all(torch.equal(restored.logits[k], clean.logits[k]) for k in clean.logits)
    only_tokens = run_patched(model, corrupted, channel_patches("tokens", clean.cache))
    assert torch.equal(only_tokens.trace[0].input_canvas[1:], clean.trace[0].input_canvas[1:])
    assert not torch.equal(only_tokens.logits[(0, 2)], clean.logits[(0, 2)])  # self-cond and prompt still differ
    with pytest.raises(ValueError, match="unknown channel"):
        channel_patches("kv", clean.cache)


def test_sweep_shapes_labels_and_normalisation(model, prompts):
    clean_ids, corrupted_ids = prompts
    hook = "decoder.blocks.{layer}.hook_resid_pre"
    names = [hook.format(layer=i) for i in range(4)] + ["encoder.blocks.0.hook_resid_pre"]
    clean = record_run(model, clean_ids, names_filter=names, **GEN)
    corrupted = record_run(model, corrupted_ids, **GEN)
    last = clean.trace.steps(0) - 1
    clean_top = int(clean.logits_at(last)[0, 0].argmax())
    corrupt_top = int(corrupted.logits_at(last)[0, 0].argmax())
    metric = Normalized.between(LogitDiff(0, clean_top, corrupt_top, step=last), clean, corrupted)
    assert metric(clean) == pytest.approx(1.0) and metric(corrupted) == pytest.approx(0.0)
    full = [
        Patch("encoder.blocks.0.hook_resid_pre", clean.cache),
        Patch("decoder.blocks.0.hook_resid_pre", clean.cache),
    ]
    assert metric(run_patched(model, corrupted, full, mode="frozen", steps=[last])) == pytest.approx(1.0)

    sweep = patch_sweep(
        model, clean, corrupted, hook, ("layer", "position"), metric, positions=[0, 1, 2], progress=False
    )
    assert sweep.values.shape == (4, 3) and sweep.axes == ("layer", "position")
    assert sweep.labels == {"layer": [0, 1, 2, 3], "position": [0, 1, 2]}
    by_step = patch_sweep(
        model,
        clean,
        corrupted,
        "decoder.blocks.0.hook_resid_pre",
        ("step", "position"),
        metric,
        steps=[0, last],
        positions=[0, 3],
        progress=False,
    )
    assert by_step.values.shape == (2, 2) and by_step.labels["step"] == [0, last]
    assert by_step.values[0].abs().max() == 0  # frozen: a patch at step 0 cannot move the last step's logits
    raw = LogitDiff(0, clean_top, corrupt_top, step=last)
    per_cell = patch_sweep(
        model,
        clean,
        corrupted,
        "decoder.blocks.0.hook_resid_pre",
        ("step", "position"),
        raw,
        steps=[0, last],
        positions=[0, 3],
        metric_steps="cell",
        progress=False,
    )
    single = run_patched(
        model,
        corrupted,
        Patch("decoder.blocks.0.hook_resid_pre", clean.cache, steps=0, positions=3),
        mode="frozen",
        steps=[0],
    )
    # The sweep batches its cells, the single re-runs do not: other matmul shapes, so other rounding.
    atol = logit_metric_atol(model, corrupted.logits_at(last))
    single_value = LogitDiff(0, clean_top, corrupt_top, step=0)(single)
    assert per_cell.values[0, 1] == pytest.approx(single_value, rel=0, abs=atol)
    expected = []
    for position in (0, 3):
        patch = Patch("decoder.blocks.0.hook_resid_pre", clean.cache, steps=last, positions=position)
        expected.append(raw(run_patched(model, corrupted, patch, mode="frozen", steps=[last])))
    assert per_cell.values[1].tolist() == pytest.approx(expected, rel=0, abs=atol)
    assert min(abs(v) for v in expected) > 100 * atol  # the bound is far below the values compared
    with pytest.raises(ValueError, match="cell"):
        patch_sweep(model, clean, corrupted, hook, ("layer", "position"), raw, metric_steps="cell")
    with pytest.raises(ValueError, match="did not record"):
        patch_sweep(model, clean, corrupted, "decoder.blocks.{layer}.hook_mlp_out", ("layer", "position"), metric)
    fig = sweep.plot()
    assert fig.axes[0].get_xlabel() == "position"


def test_head_sweep(model, prompts):
    clean_ids, corrupted_ids = prompts
    hook = "decoder.blocks.{layer}.attn.hook_z"
    clean = record_run(model, clean_ids, names_filter=[hook.format(layer=i) for i in range(4)], **GEN)
    corrupted = record_run(model, corrupted_ids, **GEN)
    last = clean.trace.steps(0) - 1
    metric = LogitDiff(0, int(clean.logits_at(last)[0, 0].argmax()), int(corrupted.logits_at(last)[0, 0].argmax()))
    sweep = patch_sweep(model, clean, corrupted, hook, ("layer", "head"), metric, progress=False)
    assert sweep.values.shape == (4, model.cfg.num_attention_heads)
    assert sweep.labels["head"] == list(range(model.cfg.num_attention_heads))
    assert len(set(sweep.values.flatten().tolist())) > 1  # heads differ in effect
    with pytest.raises(ValueError, match="per-head hooks"):
        run_patched(model, corrupted, Patch("decoder.blocks.0.hook_resid_post", clean.cache, heads=0))


def test_attribution_is_the_first_order_effect_of_each_patch(model, prompts):
    clean_ids, corrupted_ids = prompts
    hook = "decoder.blocks.{layer}.hook_resid_pre"
    clean = record_run(model, clean_ids, names_filter=[hook.format(layer=i) for i in range(4)], **GEN)
    corrupted = record_run(model, corrupted_ids, **GEN)
    last = 4
    metric = LogitDiff(2, int(clean.logits_at(last)[0, 2].argmax()), int(corrupted.logits_at(last)[0, 2].argmax()))
    attribution = attribution_patch(model, clean, corrupted, hook, metric, steps=[1, last])
    assert attribution.values.shape == (4, 2, CANVAS["mixed"]) and attribution.labels["step"] == [1, last]
    base = metric.on_logits(corrupted.logits_at(last))
    eps = 1e-3
    for layer, position in [(1, 0), (2, 2), (3, 5)]:
        name = hook.format(layer=layer)

        def nudge(value, point, name=name):
            return value + eps * (clean.cache.get(name, step=point.ctx.step) - value)

        patched = run_patched(
            model, corrupted, Patch(name, nudge, steps=last, positions=position), mode="frozen", steps=[last]
        )
        finite_difference = float(metric.on_logits(patched.logits_at(last)) - base) / eps
        estimate = float(attribution.values[layer, 1, position])
        assert finite_difference == pytest.approx(estimate, rel=0.05, abs=1e-3)
    same = attribution_patch(model, clean, clean, hook, metric, steps=[last])
    assert same.values.abs().max() == 0


def test_steps_after_the_source_stopped_are_left_unpatched(model, prompts):
    clean_ids, corrupted_ids = prompts
    long = dict(GEN, max_denoising_steps=6)
    name = "decoder.blocks.1.hook_resid_post"
    short_run = record_run(model, clean_ids, names_filter=name, **dict(GEN, max_denoising_steps=3))
    base = record_run(model, corrupted_ids, **long)
    patched = run_patched(model, base, Patch(name, short_run.cache), names_filter=name)
    assert torch.equal(patched.cache.get(name, step=2), short_run.cache.get(name, step=2))
    assert patched.trace.steps(0) > 3
    with pytest.raises(KeyError, match="recorded"):
        run_patched(model, base, Patch(name, record_run(model, clean_ids, **GEN).cache))


def test_a_source_that_finished_before_a_canvas_carries_nothing_into_it(model, prompts):
    """A patched run may reach a canvas its source never did (another trajectory stops later): the
    source has no value there, so the patch leaves that canvas as the run computes it."""
    clean_ids, corrupted_ids = prompts
    hook = "decoder.blocks.1.hook_resid_pre"
    one_canvas = {**GEN, "max_new_tokens": CANVAS["mixed"]}
    source = record_run(model, clean_ids, names_filter=hook, **one_canvas)
    base = record_run(model, corrupted_ids, **GEN)
    assert source.cache.canvases() == [0] and len(base.trace.canvases) == 2
    patched = run_patched(model, base, Patch(hook, source.cache, positions=[0, 1]))
    first_only = run_patched(model, base, Patch(hook, source.cache, positions=[0, 1], canvases=[0]))
    assert not torch.equal(patched.logits[(0, 0)], base.logits[(0, 0)])  # the patch acts on canvas 0
    assert patched.logits.keys() == first_only.logits.keys()
    assert all(torch.equal(patched.logits[key], first_only.logits[key]) for key in patched.logits)
    assert torch.equal(patched.sequences, first_only.sequences)


def test_a_source_recorded_without_a_canvas_is_refused_there_naming_its_canvases(model, prompts):
    clean_ids, corrupted_ids = prompts
    hook = "decoder.blocks.1.hook_resid_pre"
    source = record_run(model, clean_ids, names_filter=hook, canvases=[1], **GEN)
    base = record_run(model, corrupted_ids, **GEN)
    with pytest.raises(KeyError, match=r"recorded canvases \[1\], not canvas 0.*canvases=\[1\]"):
        run_patched(model, base, Patch(hook, source.cache))
    limited = run_patched(model, base, Patch(hook, source.cache, canvases=[1]))
    assert all(torch.equal(limited.logits[(0, s)], base.logits[(0, s)]) for s in base.steps(0))


def test_negative_patch_steps_count_from_the_settings_object_as_from_the_keyword(model, prompts):
    """A run recorded with `settings=GenerationSettings(max_denoising_steps=6)` and one recorded with the
    keyword `max_denoising_steps=6` are the same run, and `steps=-5` is step 1 in both."""
    clean_ids, corrupted_ids = prompts
    hook = "decoder.blocks.1.hook_resid_pre"
    keywords = {k: v for k, v in GEN.items() if k != "max_denoising_steps"}
    by_object = dict(settings=GenerationSettings(max_denoising_steps=GEN["max_denoising_steps"]), **keywords)
    clean = record_run(model, clean_ids, names_filter=hook, **GEN)
    results = []
    for settings in (GEN, by_object):
        base = record_run(model, corrupted_ids, **settings)
        assert base.settings.max_denoising_steps == GEN["max_denoising_steps"]
        results.append(run_patched(model, base, Patch(hook, clean.cache, steps=-5), mode="frozen"))
        at_one = run_patched(model, base, Patch(hook, clean.cache, steps=1), mode="frozen")
        assert all(torch.equal(results[-1].logits[k], at_one.logits[k]) for k in at_one.logits)
        assert not torch.equal(results[-1].logits[(0, 1)], base.logits[(0, 1)])  # the patch fired at step 1
    assert all(torch.equal(results[0].logits[k], results[1].logits[k]) for k in results[0].logits)


def test_negative_patch_steps_need_the_step_budget(model):
    patch = Patch("decoder.blocks.1.hook_resid_pre", torch.zeros(()), steps=-1)
    with pytest.raises(ValueError, match="steps=-1: negative indices count back from a size not known here"):
        patch.hooks(model)
    assert len(patch.hooks(model, max_steps=6)) == 1
    assert len(Patch("decoder.blocks.1.hook_resid_pre", torch.zeros(()), steps=[0, 2]).hooks(model)) == 1
