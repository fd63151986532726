"""The fast sweep path against the per-cell reference path: same metric tensors, on a tiny random
model and the toy model. With one cell per chunk the arithmetic is the reference's, so the values are
bit-identical; batching cells changes matmul shapes (and so float32 reduction order), so chunks of
several cells agree to 1e-5."""

from __future__ import annotations

import pytest
import torch
from reference import CANVAS, build_pair

from diffusionlens import HookedDiffusionGemma
from diffusionlens.patching import LogitDiff, Patch, patch_sweep, record_run, run_patched
from diffusionlens.patching.frozen_fast import bytes_per_cell, expand_state
from diffusionlens.patching.runs import fork_state
from diffusionlens.sampling.noise import ReplayNoise, TorchRNGNoise

GEN = dict(max_new_tokens=CANVAS["mixed"] * 2, max_denoising_steps=5, eos_token_id=None)
HOOKS = [
    "decoder.blocks.{layer}.hook_resid_pre",
    "decoder.blocks.{layer}.hook_attn_out",
    "decoder.blocks.{layer}.hook_mlp_out",
    "decoder.blocks.{layer}.hook_resid_post",
    "decoder.blocks.{layer}.attn.hook_z",
]


@pytest.fixture(scope="module")
def model():
    return build_pair("mixed", seed=4)[1]


@pytest.fixture(scope="module")
def runs(model):
    g = torch.Generator().manual_seed(3)
    clean_ids = torch.randint(3, 97, (2, 9), generator=g)
    corrupted_ids = clean_ids.clone()
    corrupted_ids[:, 2:5] = torch.randint(3, 97, (2, 3), generator=g)
    layers = range(model.cfg.num_hidden_layers)
    names = [h.format(layer=layer) for h in HOOKS for layer in layers]
    names += ["decoder.hook_embed", "decoder.ln_final.hook_normalized", "sampler.hook_canvas_next"]
    clean = record_run(model, clean_ids, names_filter=names, **GEN)
    return clean, record_run(model, corrupted_ids, **GEN)


def _both(model, clean, corrupted, hook, over, batch_size, **kwargs):
    metric = LogitDiff(position=1, good=5, bad=7)
    reference = patch_sweep(model, clean, corrupted, hook, over, metric, path="reference", progress=False, **kwargs)
    fast = patch_sweep(model, clean, corrupted, hook, over, metric, batch_size=batch_size, progress=False, **kwargs)
    assert reference.metadata["path"] == "reference"
    assert reference.labels == fast.labels
    return reference, fast


@pytest.mark.parametrize(
    ("hook", "over", "kwargs"),
    [
        (HOOKS[0], ("layer", "position"), {}),
        (HOOKS[1], ("step", "position"), {"layers": [1], "metric_steps": "cell"}),
        (HOOKS[2], ("layer", "step"), {}),
        (HOOKS[3], ("step", "position"), {"layers": [0], "positions": [0, 1, 2]}),
        (HOOKS[4], ("layer", "head"), {}),
        ("decoder.hook_embed", ("step", "position"), {"positions": [0, 1, 2]}),
        ("decoder.ln_final.hook_normalized", ("step", "position"), {"positions": [0, 1]}),
    ],
)
def test_frozen_fast_sweeps_match_the_reference(model, runs, hook, over, kwargs):
    clean, corrupted = runs
    reference, one_per_chunk = _both(model, clean, corrupted, hook, over, 1, **kwargs)
    assert one_per_chunk.metadata["path"] == "fast"
    assert torch.equal(reference.values, one_per_chunk.values)
    metric = LogitDiff(position=1, good=5, bad=7)
    batched = patch_sweep(model, clean, corrupted, hook, over, metric, batch_size=7, progress=False, **kwargs)
    assert batched.stats["cells_per_chunk"] == 7
    torch.testing.assert_close(batched.values, reference.values, rtol=0, atol=1e-5)
    assert reference.values.abs().max() > 0.1  # the comparison is not between zeros


def test_free_fork_is_the_regenerated_run(model, runs):
    clean, corrupted = runs
    for step in range(corrupted.trace.steps(0)):
        patch = Patch("decoder.blocks.1.hook_resid_pre", clean.cache, steps=step, positions=[1, 2])
        regenerated = run_patched(model, corrupted, patch, mode="free")
        forked = run_patched(model, corrupted, patch, mode="free", fork_at=step)
        assert torch.equal(regenerated.sequences, forked.sequences)
        assert regenerated.logits.keys() == forked.logits.keys()
        assert all(torch.equal(regenerated.logits[k], forked.logits[k]) for k in regenerated.logits)
        for a, b in zip(regenerated.trace.canvases, forked.trace.canvases, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a.tensors().values(), b.tensors().values(), strict=True))


@pytest.mark.parametrize("hook", ["decoder.blocks.{layer}.hook_resid_pre", "sampler.hook_canvas_next"])
def test_free_fast_sweeps_match_the_reference(model, runs, hook):
    clean, corrupted = runs
    kwargs = {"mode": "free", "positions": [0, 1, 2], "layers": [1]}
    reference, fast = _both(model, clean, corrupted, hook, ("step", "position"), None, **kwargs)
    assert fast.metadata["path"] == "fast"
    assert torch.equal(reference.values, fast.values)


def test_encoder_hooks_take_the_reference_path(model, runs):
    clean_ids = runs[0].input_ids
    clean = record_run(model, clean_ids, names_filter="encoder.blocks.0.hook_resid_pre", **GEN)
    reference, fast = _both(
        model, clean, runs[1], "encoder.blocks.0.hook_resid_pre", ("step", "position"), 4, positions=[0, 1]
    )
    assert fast.metadata["path"] == "reference"
    assert torch.equal(reference.values, fast.values)


def test_memory_budget_sets_the_chunk_and_refuses_below_one_cell(model, runs):
    clean, corrupted = runs
    metric = LogitDiff(position=1, good=5, bad=7)
    one_cell = bytes_per_cell(model, corrupted, 0)
    with pytest.raises(ValueError, match=f"needs about {one_cell} bytes"):
        patch_sweep(model, clean, corrupted, HOOKS[0], ("layer", "position"), metric, max_bytes=one_cell - 1)
    sweep = patch_sweep(
        model, clean, corrupted, HOOKS[0], ("layer", "position"), metric, max_bytes=3 * one_cell, progress=False
    )
    assert sweep.stats["cells_per_chunk"] == 3 and sweep.stats["block_input_bytes"] > 0
    with pytest.raises(ValueError, match="path must be"):
        patch_sweep(model, clean, corrupted, HOOKS[0], ("layer", "position"), metric, path="quick")


def test_one_row_prompt_state_is_broadcast_not_copied(model):
    state = model.encode(torch.tensor([[3, 4, 5]]))
    expanded = expand_state(state, 8)
    assert expanded.batch_size == 8
    pairs = zip(state.keys, expanded.keys, strict=True)
    assert all(k.data_ptr() == e.data_ptr() and e.stride(0) == 0 for k, e in pairs)


def test_fork_state_needs_replayed_noise(model, runs):
    clean_ids = runs[0].input_ids
    rng_run = record_run(model, clean_ids, noise=TorchRNGNoise(), **GEN)
    with pytest.raises(ValueError, match="ReplayNoise"):
        fork_state(model, rng_run, 1)


def test_toy_sweeps_agree_where_rows_stop_early():
    model = HookedDiffusionGemma.from_pretrained("toy", progress=False)
    settings = dict(max_new_tokens=model.cfg.canvas_length, noise=ReplayNoise(0))
    clean_ids, corrupted_ids = model.to_tokens("squares 400 800:"), model.to_tokens("squares 600 800:")
    names = [f"decoder.blocks.{layer}.hook_resid_pre" for layer in range(model.cfg.num_hidden_layers)]
    names.append("sampler.hook_canvas_next")
    clean = record_run(model, clean_ids, names_filter=names, **settings)
    corrupted = record_run(model, corrupted_ids, **settings)
    assert corrupted.trace.steps(0) < 48  # the stopping rule ended the run: forks must carry its history
    good = int(clean.logits_at(-1)[0, 0].argmax())
    bad = int(corrupted.logits_at(-1)[0, 0].argmax())
    metric = LogitDiff(position=0, good=good, bad=bad)
    for hook, over, mode in [
        ("decoder.blocks.{layer}.hook_resid_pre", ("layer", "position"), "frozen"),
        ("decoder.blocks.{layer}.hook_resid_pre", ("step", "position"), "free"),
        ("sampler.hook_canvas_next", ("step", "position"), "free"),
    ]:
        kwargs = {"mode": mode, "positions": [0, 1, 2]} | ({"layers": [1]} if mode == "free" else {})
        reference = patch_sweep(model, clean, corrupted, hook, over, metric, path="reference", progress=False, **kwargs)
        fast = patch_sweep(model, clean, corrupted, hook, over, metric, batch_size=1, progress=False, **kwargs)
        assert fast.metadata["path"] == "fast"
        assert torch.equal(reference.values, fast.values), (hook, over, mode)
