"""The fast sweep path against the per-cell reference path: same metric tensors, on a tiny random
model and the toy model. With one cell per chunk the arithmetic is the reference's, so the values are
bit-identical; batching cells changes matmul shapes (and so float32 reduction order), so chunks of
several cells agree within the reordering tolerance of tests/tolerance.py. A free-running cell samples
tokens, so a last-bit difference can flip a token and send the run elsewhere: comparisons of whole batched
free runs against single runs are made in float64, where the runs keep their tokens and their floats agree
within the path's tolerance, whatever the CPU's kernels."""

from __future__ import annotations

import pytest
import torch
from reference import CANVAS, build_pair
from tolerance import logit_metric_atol, trajectory_atol

from diffusionlens import HookedDiffusionGemma
from diffusionlens.components.moe import MoE
from diffusionlens.patching import (
    ExactMatch,
    KLToClean,
    LogitDiff,
    Normalized,
    Patch,
    TargetProb,
    patch_sweep,
    record_run,
    run_patched,
)
from diffusionlens.patching.free_fast import KeptLogits, PerCellNoise, free_bytes_per_cell, run_free_cells
from diffusionlens.patching.frozen_fast import bytes_per_cell
from diffusionlens.patching.runs import fork_state
from diffusionlens.sampling.bottleneck import TokenBottleneck
from diffusionlens.sampling.loop import expand_state
from diffusionlens.sampling.noise import ReplayNoise, RowReplayNoise, TorchRNGNoise

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
    atol = logit_metric_atol(model, corrupted.logits_at(-1))
    torch.testing.assert_close(batched.values, reference.values, rtol=0, atol=atol)
    assert reference.values.abs().max() > 100 * atol  # the comparison is not between zeros


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


def _toy_runs(model):
    settings = dict(max_new_tokens=model.cfg.canvas_length, noise=ReplayNoise(0))
    clean_ids, corrupted_ids = model.to_tokens("squares 400 800:"), model.to_tokens("squares 600 800:")
    names = [f"decoder.blocks.{layer}.hook_resid_pre" for layer in range(model.cfg.num_hidden_layers)]
    names.append("sampler.hook_canvas_next")
    clean = record_run(model, clean_ids, names_filter=names, **settings)
    corrupted = record_run(model, corrupted_ids, **settings)
    assert corrupted.trace.steps(0) < 48  # the stopping rule ended the run: forks must carry its history
    good = int(clean.logits_at(-1)[0, 0].argmax())
    bad = int(corrupted.logits_at(-1)[0, 0].argmax())
    return clean, corrupted, LogitDiff(position=0, good=good, bad=bad)


def test_toy_sweeps_agree_where_rows_stop_early():
    """One cell per chunk is the reference bit for bit, frozen and free. Batched free cells, whose matmul
    shapes differ, agree within the trajectory tolerance in float64 (a float32 free run may carry the
    batch's rounding into a sampled token; see the note on batched free cells below)."""
    model = HookedDiffusionGemma.from_pretrained("toy", progress=False)
    model64 = HookedDiffusionGemma.from_pretrained("toy", dtype=torch.float64, progress=False)
    for hook, over, mode in [
        ("decoder.blocks.{layer}.hook_resid_pre", ("layer", "position"), "frozen"),
        ("decoder.blocks.{layer}.hook_resid_pre", ("step", "position"), "free"),
        ("sampler.hook_canvas_next", ("step", "position"), "free"),
    ]:
        kwargs = {"mode": mode, "positions": [0, 1, 2]} | ({"layers": [1]} if mode == "free" else {})
        clean, corrupted, metric = _toy_runs(model)
        reference = patch_sweep(model, clean, corrupted, hook, over, metric, path="reference", progress=False, **kwargs)
        fast = patch_sweep(model, clean, corrupted, hook, over, metric, batch_size=1, progress=False, **kwargs)
        assert fast.metadata["path"] == "fast"
        assert torch.equal(reference.values, fast.values), (hook, over, mode)
        if mode == "free":
            clean, corrupted, metric = _toy_runs(model64)
            reference = patch_sweep(
                model64, clean, corrupted, hook, over, metric, path="reference", progress=False, **kwargs
            )
            batched = patch_sweep(model64, clean, corrupted, hook, over, metric, batch_size=4, progress=False, **kwargs)
            assert batched.stats["chunks"] == -(-reference.values.numel() // 4)
            atol = trajectory_atol(model64, model64.cfg.canvas_length, terms=2)  # at most one canvas of 48 steps
            torch.testing.assert_close(
                batched.values, reference.values, rtol=0, atol=_stored_atol(atol, reference.values)
            )


# Free-running cells run batched: each cell's rows are its own run (same noise draws, its own stopping).
# Batching changes matmul shapes, so a batched cell's floats differ from its single run's in the last bits:
# on every CPU for the MoE's grouped experts (a row's result depends on how many tokens its expert got), and
# for every matmul under some BLAS kernels (MKL's AVX2 sgemm blocks by the batch). A free run can carry that
# into a sampled token. So whole batched runs are compared in float64, where they keep their tokens and stop
# steps and their floats agree within the trajectory tolerance; in float32 only the first patched step is.
STOP = dict(
    max_new_tokens=CANVAS["mixed"] * 3,
    max_denoising_steps=8,
    stability_threshold=0,
    confidence_threshold=2.8,  # rows stop once their mean entropy falls below: at different steps
    eos_token_id=77,  # some cells end after one or two canvases
    pad_token_id=0,
    record_top_k=2,
)
FREE_HOOKS = [
    "decoder.blocks.{layer}.hook_resid_pre",
    "decoder.blocks.{layer}.hook_resid_post",
    "decoder.blocks.{layer}.attn.hook_z",
    "sampler.hook_canvas_next",  # the tokens channel
    "decoder.self_cond.hook_logits_in",  # the self-conditioning channel
]
# The most steps a STOP run takes: every canvas it may fill, each to the step budget.
STOP_STEPS = STOP["max_denoising_steps"] * STOP["max_new_tokens"] // CANVAS["mixed"]


@pytest.fixture(scope="module")
def model64():
    return build_pair("mixed", seed=4, dtype=torch.float64)[1]


def _record_stopping(model):
    g = torch.Generator().manual_seed(3)
    clean_ids = torch.randint(3, 97, (2, 9), generator=g)
    corrupted_ids = clean_ids.clone()
    corrupted_ids[:, 2:5] = torch.randint(3, 97, (2, 3), generator=g)
    names = [h.format(layer=layer) for h in FREE_HOOKS for layer in range(model.cfg.num_hidden_layers)]
    clean = record_run(model, clean_ids, names_filter=sorted(set(names)), **STOP)
    return clean, record_run(model, corrupted_ids, **STOP)


@pytest.fixture(scope="module")
def stopping_runs(model):
    return _record_stopping(model)


@pytest.fixture(scope="module")
def stopping_runs64(model64):
    return _record_stopping(model64)


def _stored_atol(atol: float, value: torch.Tensor) -> float:
    """`atol`, or one unit in the last place of `value`'s dtype where the value is stored coarser than it
    was computed (a float64 run's metric kept as float32 may round either way)."""
    return max(atol, torch.finfo(value.dtype).eps * float(value.abs().max()))


def _assert_same_run(reference, batched, model):
    """The batched cell is its single run: the same tokens, stop steps and canvases, and floats within the
    tolerance of as many steps as the run took."""
    assert torch.equal(reference.sequences, batched.sequences)
    assert reference.trace.settings == batched.trace.settings
    assert reference.trace.model_fingerprint == batched.trace.model_fingerprint is not None
    assert len(reference.trace) == len(batched.trace)
    atol = trajectory_atol(model, sum(reference.trace.steps(c) for c in range(len(reference.trace))))
    assert reference.logits.keys() == batched.logits.keys()
    for key, value in reference.logits.items():
        torch.testing.assert_close(batched.logits[key], value, rtol=0, atol=atol)
    for ours, theirs in zip(reference.trace.canvases, batched.trace.canvases, strict=True):
        mine, other = ours.tensors(), theirs.tensors()
        assert mine.keys() == other.keys()
        for name, value in mine.items():
            if value.is_floating_point():
                torch.testing.assert_close(other[name], value, rtol=0, atol=_stored_atol(atol, value))
            else:
                assert torch.equal(other[name], value), name


def _free_patches(model, clean, corrupted):
    """Cells of several hooks forking at steps 0, 2 and 4, and one patching every step (fork at 0)."""
    patches, forks = [], []
    for step in (0, 2, 4):
        for i, hook in enumerate(FREE_HOOKS):
            layer = (step + i) % model.cfg.num_hidden_layers
            patches.append(Patch(hook.format(layer=layer), clean.cache, steps=step, positions=[0, 1, 2]))
            forks.append(step)
    patches.append(Patch("decoder.blocks.2.hook_resid_pre", clean.cache, positions=[1]))
    forks.append(0)
    return patches, forks


def _single_and_batched(model, corrupted, patches, forks, keep=None):
    references = [run_patched(model, corrupted, p, mode="free", fork_at=s) for p, s in zip(patches, forks, strict=True)]
    batched, passes = run_free_cells(model, corrupted, patches, forks, keep)
    return references, batched, passes


@pytest.mark.parametrize("routed", [False, True])
def test_batched_free_cells_are_their_own_runs(model64, stopping_runs64, monkeypatch, routed):
    """Each batched cell is its own run (trace, stop steps, logits, sequences), with grouped and routed experts."""
    monkeypatch.setattr(MoE, "gather_experts", routed)
    clean, corrupted = stopping_runs64
    patches, forks = _free_patches(model64, clean, corrupted)
    references, batched, passes = _single_and_batched(model64, corrupted, patches, forks)
    shapes = [tuple(run.trace.steps(c) for c in range(len(run.trace))) for run in references]
    assert passes < sum(sum(s) for s in shapes) // 4  # one batched pass serves many cells
    for reference, run in zip(references, batched, strict=True):
        _assert_same_run(reference, run, model64)
    # The cells stop at different steps, and some end (eos) after fewer canvases than others.
    assert len(set(shapes)) > 5 and len({len(s) for s in shapes}) > 1 and len({s[0] for s in shapes}) > 1


def test_batched_free_cells_agree_at_their_first_patched_step_in_float32(model, stopping_runs):
    """In float32 a batched cell's first patched step, which it computes from the single run's inputs, agrees
    within the reordering tolerance (later steps may have sampled another token; see the note above)."""
    clean, corrupted = stopping_runs
    patches, forks = _free_patches(model, clean, corrupted)
    references, batched, _ = _single_and_batched(model, corrupted, patches, forks)
    for step, reference, run in zip(forks, references, batched, strict=True):
        atol = logit_metric_atol(model, reference.logits[(0, step)], terms=1)
        torch.testing.assert_close(run.logits[(0, step)], reference.logits[(0, step)], rtol=0, atol=atol)


@pytest.mark.parametrize(
    ("hook", "over", "kwargs"),
    [
        (FREE_HOOKS[0], ("step", "position"), {"layers": [1], "steps": [0, 2, 4], "positions": [0, 1]}),
        (FREE_HOOKS[1], ("layer", "step"), {"layers": [0, 3], "steps": [1, 3]}),
        (FREE_HOOKS[2], ("layer", "position"), {"layers": [1, 2], "positions": [0, 3]}),
        (FREE_HOOKS[3], ("step", "position"), {"steps": [0, 2, 4], "positions": [0, 1]}),
        (FREE_HOOKS[4], ("step", "position"), {"steps": [1, 2, 4], "positions": [1, 2]}),
    ],
)
def test_batched_free_sweeps_match_the_reference(model, model64, stopping_runs, stopping_runs64, hook, over, kwargs):
    """step x position, step x layer and layer x position (every step patched: all cells fork at 0),
    and the tokens and self-conditioning channels: one cell per chunk (the default for free cells) is
    the reference's arithmetic, bit for bit; chunks of 3 (they split a step's cells) agree within the
    trajectory tolerance, in float64 (see the note above)."""
    metric = LogitDiff(position=1, good=5, bad=7)

    def sweep(model, runs, **options):
        clean, corrupted = runs
        return patch_sweep(
            model, clean, corrupted, hook, over, metric, mode="free", progress=False, **kwargs, **options
        )

    reference = sweep(model, stopping_runs, path="reference")
    default = sweep(model, stopping_runs)
    assert default.metadata["path"] == "fast" and default.stats["cells_per_chunk"] == 1
    assert torch.equal(reference.values, default.values)
    reference = sweep(model64, stopping_runs64, path="reference")
    batched = sweep(model64, stopping_runs64, batch_size=3)
    assert batched.metadata["path"] == "fast" and batched.stats["cells_per_chunk"] == 3
    assert batched.stats["chunks"] == -(-reference.values.numel() // 3)
    atol = _stored_atol(trajectory_atol(model64, STOP_STEPS, terms=2), reference.values)
    torch.testing.assert_close(batched.values, reference.values, rtol=0, atol=atol)
    assert reference.values.std() > 0.01  # the cells differ: the comparison is not between equal values


def test_batched_free_cells_keep_what_their_metric_reads(model64, stopping_runs64):
    """Metrics that read a later step, no logits at all, or a normalised value score the batched runs
    (which keep only the logits the metric reads) as they score the runs themselves."""
    clean, corrupted = stopping_runs64
    target = corrupted.answer(0)
    metrics = [
        KLToClean(clean, step=-2),
        TargetProb(position=0, token=int(target[0, 0])),
        LogitDiff(position=2, good=5, bad=7, step=1, canvas=1),
        Normalized.between(LogitDiff(position=1, good=5, bad=7), clean, corrupted),
        ExactMatch(target),
        lambda run: float(run.logits_at(0, 0)[:, 3, 4].mean() + run.trace.steps(0)),  # any function: every step
    ]
    patches, forks = _free_patches(model64, clean, corrupted)
    patches, forks = patches[::4], forks[::4]
    references = [
        run_patched(model64, corrupted, p, mode="free", fork_at=s) for p, s in zip(patches, forks, strict=True)
    ]
    # A normalised difference divides by the clean-corrupted gap, so it gets that gap's relative tolerance.
    atol = trajectory_atol(model64, STOP_STEPS, terms=4) / min(
        1.0, abs(metrics[3].clean_value - metrics[3].corrupted_value)
    )
    for metric in metrics:
        runs, _ = run_free_cells(model64, corrupted, patches, forks, [KeptLogits.of(metric)] * len(patches))
        expected = [metric(run) for run in references]
        assert [metric(run) for run in runs] == pytest.approx(expected, rel=0, abs=atol), metric


def test_kept_logits_are_what_the_metric_reads():
    assert KeptLogits.of(LogitDiff(0, 1, 2)) == KeptLogits("one", 0, -1)
    assert KeptLogits.of(Normalized(TargetProb(0, 1, step=3, canvas=1), 0.0, 1.0)) == KeptLogits("one", 1, 3)
    assert KeptLogits.of(ExactMatch(torch.zeros(1, 8))) == KeptLogits("none")
    assert KeptLogits.of(lambda run: 0.0) == KeptLogits("all")
    logits: dict = {}
    keep = KeptLogits("one", 0, -2)
    for step in range(5):
        keep.keep(logits, 0, step, torch.full((1, 2, 3), float(step)))
        keep.keep(logits, 1, step, torch.zeros(1, 2, 3))
    assert sorted(logits) == [(0, 3), (0, 4)]


def test_free_memory_budget_sets_the_chunk_and_refuses_below_one_cell(model, stopping_runs):
    clean, corrupted = stopping_runs
    metric = LogitDiff(position=1, good=5, bad=7)
    one_cell = free_bytes_per_cell(model, corrupted, KeptLogits.of(metric))
    assert one_cell > free_bytes_per_cell(model, corrupted, KeptLogits("none"))
    kwargs = {"mode": "free", "layers": [0], "positions": [0, 1], "progress": False}
    hook = "decoder.blocks.{layer}.hook_resid_pre"
    with pytest.raises(ValueError, match=f"needs about {one_cell} bytes"):
        patch_sweep(model, clean, corrupted, hook, ("step", "position"), metric, max_bytes=one_cell - 1, **kwargs)
    sweep = patch_sweep(model, clean, corrupted, hook, ("step", "position"), metric, max_bytes=4 * one_cell, **kwargs)
    assert sweep.stats["cells_per_chunk"] == 4 and sweep.stats["bytes_per_cell"] == one_cell


def test_per_cell_noise_gives_each_cell_its_own_draws():
    noise = PerCellNoise(ReplayNoise(5), rows=2)
    probs = torch.softmax(torch.randn(6, 4, 11, generator=torch.Generator().manual_seed(0)), -1)
    draws = noise.sample(probs, 0, 3)
    for cell in range(3):
        part = slice(2 * cell, 2 * cell + 2)
        assert torch.equal(draws[part], ReplayNoise(5).sample(probs[part], 0, 3))
        assert torch.equal(noise.renoise(6, 4, 11, "cpu", 1, 2)[part], ReplayNoise(5).renoise(2, 4, 11, "cpu", 1, 2))


def test_batched_free_cells_broadcast_a_one_row_prompt(model, monkeypatch):
    ids = torch.randint(3, 97, (1, 9), generator=torch.Generator().manual_seed(5))
    clean = record_run(model, ids, names_filter="decoder.blocks.1.hook_resid_pre", **STOP)
    corrupted = record_run(model, ids.flip(1), **STOP)
    state = model.encode(corrupted.input_ids)
    seen = []
    denoise = type(model).denoise

    def spy(self, canvas, prompt_state, *args, **kwargs):
        seen.append((self.hook_ctx.canvas, canvas.shape[0], prompt_state.keys[0]))
        return denoise(self, canvas, prompt_state, *args, **kwargs)

    monkeypatch.setattr(type(model), "denoise", spy)
    patches = [
        Patch("decoder.blocks.1.hook_resid_pre", clean.cache, steps=s, positions=[p]) for s in (0, 1) for p in (0, 1)
    ]
    run_free_cells(model, corrupted, patches, [0, 0, 1, 1], prompt_state=state)
    first_canvas = [keys for canvas, rows, keys in seen if canvas == 0 and rows > 1]
    assert first_canvas and all(k.stride(0) == 0 and k.data_ptr() == state.keys[0].data_ptr() for k in first_canvas)
    assert {rows for canvas, rows, _ in seen if canvas == 0} >= {2, 4}  # two cells, then two more join


def test_batched_free_cells_with_a_bottleneck_and_row_seeds(model64, stopping_runs64):
    """A self-conditioning bottleneck is applied to each cell's rows; RowReplayNoise draws per row."""
    clean, corrupted = stopping_runs64
    settings = dict(STOP, bottleneck=TokenBottleneck(top_k=4), noise=RowReplayNoise([3, 8]))
    base = record_run(model64, corrupted.input_ids, **settings)
    patches, forks = _free_patches(model64, clean, base)
    patches, forks = patches[::3], forks[::3]
    references, batched, _ = _single_and_batched(model64, base, patches, forks)
    for reference, run in zip(references, batched, strict=True):
        _assert_same_run(reference, run, model64)
