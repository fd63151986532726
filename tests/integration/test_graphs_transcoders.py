"""Transcoders (#35): SAELens training and exact conversion, splicing hooks, the quality table, the shipped
toy set and the refusals of a set made for another model."""

from pathlib import Path

import pytest
import torch
from random_models import CFG, random_model
from tolerance import logit_metric_atol

import diffusionlens
from diffusionlens import DiffusionGemmaConfig, HookedDiffusionGemma, ReplayNoise
from diffusionlens.graphs import TranscoderSet, load_transcoders
from diffusionlens.graphs.quality import format_quality, toy_quality, transcoder_quality
from diffusionlens.graphs.splicing import FeatureIntervention, intervention_hooks, transcoder_hooks
from diffusionlens.graphs.training import main as train_main
from diffusionlens.graphs.training import train_transcoder, transcoder_from_sae_lens
from diffusionlens.graphs.transcoders import (
    SHIPPED_TRANSCODERS,
    Transcoder,
    model_config_summary,
    random_transcoders,
    transcoder_input_hook,
    transcoder_output_hook,
)
from diffusionlens.weights.fingerprint import model_fingerprint

sae_lens = pytest.importorskip("sae_lens")


@pytest.fixture(scope="module")
def tiny():
    return random_model(torch.float32)


@pytest.fixture(scope="module")
def tiny_set(tiny):
    return random_transcoders(tiny, 16, seed=3)


def tiny_inputs(batch=2):
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(3, CFG.vocab_size, (batch, 6), generator=generator)
    canvas = torch.randint(3, CFG.vocab_size, (batch, CFG.canvas_length), generator=generator)
    return ids, canvas


# ------------------------------------------------------------------------------------------ SAELens
def random_sae_lens_transcoder(jumprelu: bool, d: int = 12, width: int = 20):
    config_class = sae_lens.JumpReLUTranscoderConfig if jumprelu else sae_lens.TranscoderConfig
    model_class = sae_lens.JumpReLUTranscoder if jumprelu else sae_lens.Transcoder
    torch.manual_seed(0)
    transcoder = model_class(config_class(d_in=d, d_sae=width, d_out=d, apply_b_dec_to_input=False))
    with torch.no_grad():
        for tensor in transcoder.parameters():
            tensor.copy_(torch.randn_like(tensor) * 0.5)
        if jumprelu:
            transcoder.threshold.abs_()
    return transcoder.eval()


@pytest.mark.parametrize("jumprelu", [True, False])
def test_sae_lens_transcoder_converts_exactly(jumprelu):
    theirs = random_sae_lens_transcoder(jumprelu)
    ours = transcoder_from_sae_lens(theirs)
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ours.encode(x), theirs.encode(x))  # the same ops on the same tensors
        assert torch.equal(ours(x), theirs(x))
    assert bool((theirs.encode(x) == 0).any()) and bool((theirs.encode(x) > 0).any())
    if jumprelu:  # features with 0 < pre <= threshold are cut, as SAELens cuts them
        pre = x @ theirs.W_enc + theirs.b_enc
        assert bool(((pre > 0) & (pre <= theirs.threshold)).any())


def test_sae_lens_conversion_refuses_what_it_cannot_hold():
    skip = sae_lens.SkipTranscoder(sae_lens.SkipTranscoderConfig(d_in=8, d_sae=4, d_out=8, apply_b_dec_to_input=False))
    with pytest.raises(ValueError, match="W_skip"):
        transcoder_from_sae_lens(skip)
    wider = sae_lens.Transcoder(sae_lens.TranscoderConfig(d_in=8, d_sae=4, d_out=6, apply_b_dec_to_input=False))
    with pytest.raises(ValueError, match="8 to 6"):
        transcoder_from_sae_lens(wider)
    with pytest.raises(TypeError, match="SAELens Transcoder"):
        transcoder_from_sae_lens(sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=8, d_sae=4)))


def synthetic_pairs(rows=6000, d=16, hidden=40):
    """A sparse feed-forward map y = relu(x A - 1) B on scaled-up inputs: a transcoder can learn it."""
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(rows, d, generator=generator) * 3.0
    a = torch.randn(d, hidden, generator=generator) / d**0.5
    b = torch.randn(hidden, d, generator=generator) * 0.2
    return x, torch.relu(x @ a - 1.0) @ b


def test_training_learns_the_map_on_unscaled_data_and_is_seeded():
    x, y = synthetic_pairs()
    kwargs = {"d_transcoder": 64, "training_samples": 60_000, "batch_size": 256, "lr": 3e-3, "target_l0": 12}
    trained = train_transcoder(x, y, seed=4, progress=False, **kwargs)
    assert isinstance(trained, sae_lens.JumpReLUTranscoder) and trained.cfg.d_out == 16
    ours = transcoder_from_sae_lens(trained)
    with torch.no_grad():
        fve = 1 - (y - ours(x)).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
        l0 = (ours.encode(x) > 0).float().sum(-1).mean()
    # the scales used in training are folded in: a transcoder left at the scaled data is far off (x is 3x)
    assert fve > 0.7, float(fve)
    assert 0 < l0 < 64
    again = transcoder_from_sae_lens(train_transcoder(x, y, seed=4, progress=False, **kwargs))
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), again.state_dict().values(), strict=True))
    with pytest.raises(ValueError, match="set by train_transcoder"):
        train_transcoder(x, y, normalize_activations="none", **kwargs)


# ------------------------------------------------------------------------------------------ splicing
def test_splice_replaces_ffn_out_by_the_transcoder(tiny, tiny_set):
    ids, canvas = tiny_inputs()
    names = [transcoder_input_hook(1), transcoder_output_hook(1), transcoder_output_hook(2)]
    _, clean = tiny.run_with_cache(ids, canvas, names_filter=names)
    _, spliced = tiny.run_with_cache(ids, canvas, names_filter=names, fwd_hooks=transcoder_hooks(tiny_set, layers=[1]))
    x = spliced[transcoder_input_hook(1)]
    assert torch.equal(x, clean[transcoder_input_hook(1)])  # layer 1's input is upstream of its splice
    with torch.no_grad():
        assert torch.equal(spliced[transcoder_output_hook(1)], tiny_set[1](x))
    assert not torch.equal(spliced[transcoder_output_hook(2)], clean[transcoder_output_hook(2)])
    after, cache_after = tiny.run_with_cache(ids, canvas, names_filter=names)  # the hooks went with the run
    assert torch.equal(cache_after[transcoder_output_hook(2)], clean[transcoder_output_hook(2)])


def test_error_term_keeps_the_run_and_exposes_the_features(tiny, tiny_set):
    ids, canvas = tiny_inputs()
    seen = {}
    hooks = transcoder_hooks(tiny_set, use_error_term=True, on_feature_acts=lambda a, h: seen.setdefault(h.name, a))
    names = [transcoder_input_hook(layer) for layer in range(3)]
    logits, cache = tiny.run_with_cache(ids, canvas, names_filter=names, fwd_hooks=hooks)
    assert torch.equal(logits, tiny(ids, canvas))
    assert sorted(seen) == sorted(transcoder_output_hook(layer) for layer in range(3))
    with torch.no_grad():
        for layer in range(3):
            assert torch.equal(seen[transcoder_output_hook(layer)], tiny_set[layer].encode(cache[names[layer]]))


def test_feature_edit_with_error_term_adds_only_the_edit(tiny, tiny_set):
    ids, canvas = tiny_inputs()
    names = [transcoder_input_hook(0), transcoder_output_hook(0)]
    _, clean = tiny.run_with_cache(ids, canvas, names_filter=names)

    def ablate_first_feature(acts, hook):
        return acts * (torch.arange(acts.shape[-1]) != 0)

    hooks = transcoder_hooks(tiny_set, layers=[0], use_error_term=True, feature_edit=ablate_first_feature)
    _, edited = tiny.run_with_cache(ids, canvas, names_filter=names, fwd_hooks=hooks)
    transcoder = tiny_set[0]
    with torch.no_grad():
        acts = transcoder.encode(clean[names[0]])
        expected = clean[names[1]] + (transcoder.decode(ablate_first_feature(acts, None)) - transcoder.decode(acts))
    assert bool((acts[..., 0] > 0).any())  # the edit does something
    assert torch.equal(edited[names[1]], expected)


def test_splice_at_chosen_steps_only(tiny, tiny_set):
    ids, _ = tiny_inputs()
    name = transcoder_output_hook(2)
    kwargs = {
        "noise": ReplayNoise(0),
        "progress": False,
        "names_filter": [name],
        "max_denoising_steps": 3,
        "max_new_tokens": CFG.canvas_length,
    }
    _, clean = tiny.generate_with_cache(ids, **kwargs)
    _, spliced = tiny.generate_with_cache(ids, fwd_hooks=transcoder_hooks(tiny_set, steps=[1]), **kwargs)
    assert torch.equal(spliced.get(name, canvas=0, step=0), clean.get(name, canvas=0, step=0))
    assert not torch.equal(spliced.get(name, canvas=0, step=1), clean.get(name, canvas=0, step=1))
    with pytest.raises(IndexError, match="layers 0..2"):
        transcoder_hooks(tiny_set, layers=[3])


def test_intervention_edits_one_feature_at_one_step_and_position(tiny, tiny_set):
    ids, _ = tiny_inputs()
    names = [transcoder_input_hook(1), transcoder_output_hook(1)]
    kwargs = {"noise": ReplayNoise(0), "progress": False, "names_filter": names, "max_denoising_steps": 3}
    kwargs["max_new_tokens"] = CFG.canvas_length
    _, clean = tiny.generate_with_cache(ids, **kwargs)
    transcoder = tiny_set[1]
    with torch.no_grad():
        acts = transcoder.encode(clean.get(names[0], canvas=0, step=1))
    feature = int(acts[0, 2].argmax())
    assert float(acts[0, 2, feature]) > 0
    steer = FeatureIntervention(step=1, layer=1, position=2, feature=feature, value=3.0 * float(acts[0, 2, feature]))
    _, edited = tiny.generate_with_cache(ids, fwd_hooks=intervention_hooks(tiny_set, [steer], model=tiny), **kwargs)
    assert torch.equal(edited.get(names[1], canvas=0, step=0), clean.get(names[1], canvas=0, step=0))
    with torch.no_grad():
        changed = acts.clone()
        changed[:, 2, feature] = steer.value
        expected = clean.get(names[1], canvas=0, step=1) + (transcoder.decode(changed) - transcoder.decode(acts))
    out = edited.get(names[1], canvas=0, step=1)
    assert torch.equal(out, expected)
    keep = torch.arange(CFG.canvas_length) != 2
    assert torch.equal(out[:, keep], clean.get(names[1], canvas=0, step=1)[:, keep])
    with pytest.raises(IndexError, match="features 0..15"):
        intervention_hooks(tiny_set, [FeatureIntervention(step=0, layer=0, position=0, feature=16)])


# ------------------------------------------------------------------------------------------ refusals
def test_a_set_for_another_model_is_refused_naming_the_mismatch(tiny, tiny_set, tmp_path):
    wider = HookedDiffusionGemma.from_config(DiffusionGemmaConfig(**{**CFG.__dict__, "hidden_size": 32}))
    with pytest.raises(ValueError, match="hidden_size is 32"):
        tiny_set.check(wider)
    with pytest.raises(ValueError, match="hidden_size is 32"):
        transcoder_hooks(tiny_set, model=wider)
    deeper_cfg = {**CFG.__dict__, "num_hidden_layers": 4, "layer_types": (*CFG.layer_types, "full_attention")}
    with pytest.raises(ValueError, match="3 transcoders but the model has 4 decoder layers"):
        tiny_set.check(HookedDiffusionGemma.from_config(DiffusionGemmaConfig(**deeper_cfg)))
    # a trained set records the weights it was trained on: a retrained model of the same config is refused
    stamped = TranscoderSet(
        list(tiny_set.transcoders), model_config_summary(tiny), {"model_fingerprint": model_fingerprint(tiny)}
    )
    path = stamped.save(tmp_path / "set.safetensors")
    assert len(load_transcoders(path, model=tiny)) == 3
    retrained = random_model(torch.float32)
    with torch.no_grad():
        retrained.decoder.embed.W_E[0, 0] += 1.0
    with pytest.raises(ValueError, match="its weights differ"):
        load_transcoders(path, model=retrained)
    assert len(load_transcoders(path, model=retrained, fingerprint=False)) == 3
    with pytest.raises(FileNotFoundError, match="'toy'"):
        load_transcoders(tmp_path / "missing.safetensors")


# ------------------------------------------------------------------------------------------ quality
def test_quality_table_matches_direct_measurements(tiny, tiny_set):
    ids, _ = tiny_inputs(3)
    kwargs = {"max_denoising_steps": 3, "max_new_tokens": CFG.canvas_length, "seed": 7}
    quality = transcoder_quality(tiny, tiny_set, ids, batch_size=2, **kwargs)
    # step 0, layer 1's fraction of variance explained, from a plain cached run of the same prompts
    names = [transcoder_input_hook(1), transcoder_output_hook(1)]
    xs, ys = [], []
    for start in (0, 2):
        _, cache = tiny.generate_with_cache(
            ids[start : start + 2],
            names_filter=names,
            noise=ReplayNoise(7 + start),
            progress=False,
            max_denoising_steps=3,
            max_new_tokens=CFG.canvas_length,
        )
        xs.append(cache.get(names[0], canvas=0, step=0))
        ys.append(cache.get(names[1], canvas=0, step=0))
    x, y = torch.cat(xs).flatten(0, 1).double(), torch.cat(ys).flatten(0, 1).double()
    with torch.no_grad():
        prediction = tiny_set[1](x.float()).double()
    fve = 1 - (y - prediction).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
    assert quality.steps[0].rows == 3
    assert abs(quality.steps[0].fve[1] - float(fve)) < 1e-6
    # step 0's loss change with layer 2 spliced, against the clean run's own final canvas (first chunk alone)
    first = transcoder_quality(tiny, tiny_set, ids[:2], batch_size=2, **kwargs)
    run = tiny.generate(
        ids[:2], noise=ReplayNoise(7), progress=False, max_denoising_steps=3, max_new_tokens=CFG.canvas_length
    )
    canvas0, goal = run.trace[0].input_canvas[0].clone(), run.trace[0].final.clone()
    with torch.no_grad():
        clean = tiny(ids[:2], canvas0, return_type="loss", targets=goal)
        with tiny.hooks(fwd_hooks=transcoder_hooks(tiny_set, layers=[2])):
            spliced = tiny(ids[:2], canvas0, return_type="loss", targets=goal)
    atol = logit_metric_atol(tiny)
    assert abs(first.steps[0].loss - float(clean)) < atol
    assert abs(first.steps[0].delta_loss_by_layer[2] - float(spliced - clean)) < atol
    assert first.steps[0].delta_loss_by_layer[2] != 0
    assert quality.exact_match_clean is None and "| 0 | 3 |" in format_quality(quality)


@pytest.fixture(scope="module")
def toy():
    return HookedDiffusionGemma.from_pretrained("toy", progress=False)


def test_ablating_every_feed_forward_block_breaks_the_toys_answers(toy):
    """Exact match in the table is measured: transcoders that output nothing (every feed-forward block
    ablated) at every step lose the answers the clean toy gets right."""
    d = toy.cfg.hidden_size
    silent = TranscoderSet(
        [Transcoder(torch.zeros(d, 4), torch.zeros(4), torch.zeros(4, d), torch.zeros(d)) for _ in range(6)],
        model_config_summary(toy),
    )
    quality = toy_quality(toy, silent, n=4, batch_size=2)  # chunks of two prompts stop at different steps
    assert quality.exact_match_clean >= 0.5
    assert quality.exact_match_all_steps == 0.0
    for row in quality.steps:  # a splice at step s changes only the answers of rows still running at s
        assert abs(row.exact_match - quality.exact_match_clean) <= row.rows / quality.prompts
    assert all(max(row.fve) <= 0 and max(row.l0) == 0 for row in quality.steps)  # predicting 0 explains nothing
    assert all(row.delta_loss_all > 0 for row in quality.steps)


# ------------------------------------------------------------------------------------------ shipped set
def test_shipped_toy_set_loads_against_the_toy_and_refuses_a_retrained_one(toy):
    assert SHIPPED_TRANSCODERS["toy"].is_file(), (
        "retrain: python -m diffusionlens.graphs.training --model toy --out ..."
    )
    transcoders = load_transcoders("toy", model=toy)  # fails once the toy is retrained: retrain the set then
    assert len(transcoders) == toy.cfg.num_hidden_layers
    assert 4 * toy.cfg.hidden_size <= transcoders[0].d_transcoder <= 8 * toy.cfg.hidden_size
    assert SHIPPED_TRANSCODERS["toy"].stat().st_size < 10 * 2**20
    tomllib = pytest.importorskip("tomllib")  # a wheel ships only what pyproject's package-data names
    globs = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["tool"]["setuptools"]
    shipped = SHIPPED_TRANSCODERS["toy"].relative_to(Path(diffusionlens.__file__).parent)
    assert any(shipped.match(glob) for glob in globs["package-data"]["diffusionlens"])
    quality = transcoders.metadata["quality"]
    assert quality["steps"][0]["rows"] > 0 and min(quality["steps"][0]["fve"]) > 0.5
    changed = HookedDiffusionGemma.from_pretrained("toy", progress=False)
    with torch.no_grad():
        changed.decoder.blocks[0].mlp.gate_proj.weight[0, 0] += 1.0
    with pytest.raises(ValueError, match="trained on another model: its weights differ"):
        load_transcoders("toy", model=changed)


def test_training_command_writes_a_set_with_its_quality(toy, tmp_path):
    out = tmp_path / "set.safetensors"
    train_main(
        ["--model", "toy", "--out", str(out), "--prompts", "4", "--width", "32", "--training-samples", "2048"]
        + ["--batch-size", "256", "--eval-prompts", "2", "--no-progress"]
    )
    transcoders = load_transcoders(out, model=toy)
    assert transcoders[0].d_transcoder == 32
    assert transcoders.metadata["training"]["prompts"] == 4
    assert transcoders.metadata["quality"]["prompts"] == 2
