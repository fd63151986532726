"""Figures: each returns a matplotlib Figure whose cells, texts and axes follow the trace, and saves as PNG and SVG."""

from __future__ import annotations

import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")

from matplotlib.collections import PathCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.image import AxesImage  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from diffusionlens import DiffusionGemmaConfig, HookedDiffusionGemma, ReplayNoise  # noqa: E402
from diffusionlens.analysis import logit_lens_token_scores  # noqa: E402
from diffusionlens.patching.sweep import SweepResult  # noqa: E402
from diffusionlens.sampling.trace import CanvasTrace, DenoisingTrace  # noqa: E402
from diffusionlens.toy import build_tokenizer  # noqa: E402
from diffusionlens.viz import (  # noqa: E402
    plot_commit_order,
    plot_entropy,
    plot_logit_lens,
    plot_logit_lens_by_step,
    plot_sweep,
    plot_sweeps,
    plot_token_grid,
)
from diffusionlens.viz._common import visible  # noqa: E402

WORDS = ["a", "b", "$x$", " ", "<eos>", "cc"]


def decode(token: int) -> str:
    return WORDS[token]


@pytest.fixture
def trace() -> CanvasTrace:
    """Batch of 2, canvas of 6, 4 steps; row 1 stops after step 2. `$x$` must not turn into mathtext."""
    steps, batch, length = 4, 2, 6
    g = torch.Generator().manual_seed(0)
    argmax = torch.randint(0, len(WORDS), (steps, batch, length), generator=g)
    argmax[2:] = argmax[1]  # everything commits by step 1 ...
    argmax[3, 0, 4] = (argmax[2, 0, 4] + 1) % len(WORDS)  # ... except row 0, position 4, at step 3
    argmax[:, 0, 2] = 2
    accepted = torch.rand(steps, batch, length, generator=g) < 0.5
    finished = torch.tensor([[False, False], [False, False], [False, True], [True, True]])
    return CanvasTrace(
        input_canvas=torch.randint(0, len(WORDS), (steps, batch, length), generator=g),
        sampled=argmax.roll(1, dims=-1),
        argmax=argmax,
        entropy=torch.rand(steps, batch, length, generator=g) * 3,
        accepted=accepted,
        next_canvas=argmax,
        finished=finished,
        temperature=torch.linspace(0.8, 0.4, steps),
        t=torch.arange(steps, 0, -1),
    )


def cell_texts(fig: Figure) -> list[str]:
    return [t.get_text() for t in fig.axes[0].texts]


def image(fig: Figure) -> AxesImage:
    images = fig.axes[0].get_images()
    assert len(images) == 1
    return images[0]


def assert_saves(fig: Figure, tmp_path, name: str) -> None:
    fig.savefig(tmp_path / f"{name}.png")
    fig.savefig(tmp_path / f"{name}.svg")
    assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in (tmp_path / f"{name}.svg").read_text()


# --------------------------------------------------------------------------- trajectory figures


@pytest.mark.parametrize("row, n_steps", [(0, 4), (1, 3)])
def test_token_grid_cells_follow_the_trace(trace, row, n_steps, tmp_path):
    fig = plot_token_grid(trace, decode, row=row)
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    length = trace.argmax.shape[-1]
    assert cell_texts(fig) == [visible(WORDS[i]) for i in trace.argmax[:n_steps, row].flatten().tolist()]
    assert "$x$" in cell_texts(fig) and not any(t.get_parse_math() for t in fig.axes[0].texts)
    assert image(fig).get_array().shape == (n_steps, length)
    assert image(fig).get_array().tolist() == trace.accepted[:n_steps, row].int().tolist()
    outlines = [p for p in fig.axes[0].patches if isinstance(p, Rectangle)]
    corners = sorted((int(p.get_x() + 0.5), int(p.get_y() + 0.5)) for p in outlines)
    assert corners == sorted(enumerate(trace.commit_step()[row].tolist()))
    assert_saves(fig, tmp_path, "token_grid")


def test_token_grid_crops_and_picks_the_field(trace):
    fig = plot_token_grid(trace, decode, positions=[5, 1, 3], max_positions=2, tokens="sampled")
    assert cell_texts(fig) == [visible(WORDS[i]) for i in trace.sampled[:, 0][:, [5, 1]].flatten().tolist()]
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["5", "1"]
    fig = plot_token_grid(DenoisingTrace([trace], 2), None, positions=slice(2, 4))
    assert cell_texts(fig) == [str(i) for i in trace.argmax[:, 0, 2:4].flatten().tolist()]
    with pytest.raises(ValueError):
        plot_token_grid(trace, decode, tokens="logits")
    with pytest.raises(ValueError, match=r"positions=\[6\] is out of range for 6 canvas positions"):
        plot_token_grid(trace, decode, positions=[6])
    with pytest.raises(IndexError):
        plot_token_grid(trace, decode, row=2)


def test_entropy_heatmap(trace, tmp_path):
    fig = plot_entropy(trace, decode, row=1, max_positions=4)
    assert len(fig.axes) == 2  # the heatmap and its colorbar
    values = torch.tensor(image(fig).get_array().tolist())
    torch.testing.assert_close(values, trace.entropy[:3, 1, :4])
    dots = [c for c in fig.axes[0].collections if isinstance(c, PathCollection)]
    assert len(dots) == 1 and len(dots[0].get_offsets()) == int(trace.accepted[:3, 1, :4].sum())
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == [f"{p}\n{visible(WORDS[int(trace.argmax[2, 1, p])])}" for p in range(4)]
    assert_saves(fig, tmp_path, "entropy")
    no_dots = plot_entropy(trace, mark_accepted=False)
    assert not [c for c in no_dots.axes[0].collections if isinstance(c, PathCollection)]


def test_commit_order(trace, tmp_path):
    fig = plot_commit_order(trace, decode)
    commits = trace.commit_step()[0]
    assert commits.tolist()[4] == 3 and commits.max() == 3
    assert cell_texts(fig) == [visible(WORDS[i]) for i in trace.final[0].tolist()]
    points = [c for c in fig.axes[0].collections if isinstance(c, PathCollection)]
    assert len(points) == 1
    assert points[0].get_offsets()[:, 1].tolist() == commits.float().tolist()
    assert_saves(fig, tmp_path, "commit_order")
    cropped = plot_commit_order(trace, decode, positions=range(1, 6), max_positions=3)
    assert cell_texts(cropped) == [visible(WORDS[i]) for i in trace.final[0, 1:4].tolist()]


def test_figures_draw_into_a_given_axes(trace):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3)
    assert plot_token_grid(trace, decode, ax=axes[0]) is fig
    assert plot_entropy(trace, decode, ax=axes[1]) is fig
    assert plot_commit_order(trace, decode, ax=axes[2]) is fig
    assert len(axes[0].texts) == trace.argmax[:, 0].numel()


def test_plot_sweep_is_still_exported():
    assert callable(plot_sweep)


# --------------------------------------------------------------------------- logit lens


@pytest.fixture(scope="module")
def lens_runs():
    """A small random model with the toy tokenizer (the figure is a function of the cache, not of the
    weights): a cache with the residual hooks at every position, and one recorded at positions 2..9."""
    torch.manual_seed(0)
    cfg = DiffusionGemmaConfig(
        vocab_size=44,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        global_head_dim=8,
        num_global_key_value_heads=1,
        layer_types=("sliding_attention", "sliding_attention", "full_attention"),
        sliding_window=4,
        num_experts=2,
        top_k_experts=1,
        moe_intermediate_size=8,
        canvas_length=12,
        max_position_embeddings=128,
    )
    model = HookedDiffusionGemma.from_config(cfg)
    model.tokenizer = build_tokenizer()
    n = cfg.num_hidden_layers
    names = [f"decoder.blocks.{i}.hook_resid_pre" for i in range(n)] + [f"decoder.blocks.{n - 1}.hook_resid_post"]
    kwargs = dict(names_filter=names, max_new_tokens=12, max_denoising_steps=3, noise=ReplayNoise(0), progress=False)
    ids = model.to_tokens("squares 400 800:")
    _, full = model.generate_with_cache(ids, **kwargs)
    _, some = model.generate_with_cache(ids, positions=range(2, 10), **kwargs)
    return model, full, some


def test_logit_lens_grid(lens_runs, tmp_path):
    model, cache, _ = lens_runs
    step = cache.steps(0)[-1]
    fig = plot_logit_lens(cache, step, model.tokenizer, max_positions=7)
    lens = cache.logit_lens(step)
    n_rows = model.cfg.num_hidden_layers + 1
    assert lens.shape[0] == n_rows
    probs = torch.softmax(lens[:, 0, :7].float(), dim=-1)
    top_prob, top_token = probs.max(-1)
    assert len(fig.axes) == 2
    torch.testing.assert_close(torch.tensor(image(fig).get_array().tolist()), top_prob)
    want = [visible(model.tokenizer.decode([i])) for i in top_token.flatten().tolist()]
    assert cell_texts(fig) == want
    assert len(fig.axes[0].get_yticklabels()) == n_rows
    assert_saves(fig, tmp_path, "logit_lens")


def test_logit_lens_on_a_position_filtered_cache(lens_runs):
    model, _, cache = lens_runs
    assert cache.positions == list(range(2, 10))
    fig = plot_logit_lens(cache, 0, model.tokenizer)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == [str(p) for p in range(2, 10)]
    fig = plot_logit_lens(cache, 0, model.tokenizer, positions=[9, 3])
    lens = cache.logit_lens(0)[:, 0, [7, 1]].float()
    want = [visible(model.tokenizer.decode([i])) for i in lens.argmax(-1).flatten().tolist()]
    assert cell_texts(fig) == want
    with pytest.raises(ValueError, match="not recorded"):
        plot_logit_lens(cache, 0, model.tokenizer, positions=[0])


@pytest.mark.parametrize("metric", ["prob", "logit_diff"])
def test_logit_lens_by_step_grid(lens_runs, metric, tmp_path):
    model, cache, _ = lens_runs
    position, tokens = 3, [5, 9]
    chosen = tokens[:1] if metric == "prob" else tokens
    fig = plot_logit_lens_by_step(logit_lens_token_scores(cache, position, chosen, metric=metric), model.tokenizer)
    steps, n_layers = cache.steps(0), model.cfg.num_hidden_layers + 1
    want = []
    for step in steps:
        lens = cache.logit_lens(step)[:, 0, position].float()  # [layer, vocab]
        if metric == "prob":
            want.append(torch.softmax(lens, -1)[:, tokens[0]])
        else:
            want.append(lens[:, tokens[0]] - lens[:, tokens[1]])
    want = torch.stack(want)
    assert want.shape == (len(steps), n_layers)
    torch.testing.assert_close(fig.lens_scores.values, want)
    torch.testing.assert_close(torch.tensor(image(fig).get_array().tolist()), want)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == [str(s) for s in steps]
    assert len(fig.axes[0].get_xticklabels()) == n_layers
    low, high = image(fig).get_clim()
    assert (low, high) == (0, 1) if metric == "prob" else low == -high
    names = [visible(model.tokenizer.decode([t])) for t in chosen]
    assert names[0] in fig.axes[1].get_ylabel()
    assert_saves(fig, tmp_path, f"lens_by_step_{metric}")


def test_logit_lens_by_step_refusals(lens_runs):
    model, _, some = lens_runs
    with pytest.raises(ValueError, match="two tokens"):
        logit_lens_token_scores(some, 3, [5], metric="logit_diff")
    with pytest.raises(ValueError, match="metric must be one of"):
        logit_lens_token_scores(some, 3, [5], metric="kl")
    with pytest.raises(ValueError, match="position 0 was not recorded"):
        logit_lens_token_scores(some, 0, [5])
    with pytest.raises(ValueError, match="out of range"):
        logit_lens_token_scores(some, 3, [model.cfg.vocab_size])
    with pytest.raises(IndexError, match="row 1 out of range"):
        logit_lens_token_scores(some, 3, [5], row=1)


def sweep(values: torch.Tensor, steps: list[int], hook: str) -> SweepResult:
    labels = {"step": steps, "position": list(range(values.shape[1]))}
    return SweepResult(values, ("step", "position"), labels, {"hook": hook, "mode": "frozen"})


def test_sweeps_share_one_colour_scale_with_a_per_step_baseline(tmp_path):
    g = torch.Generator().manual_seed(0)
    small = sweep(torch.rand(3, 5, generator=g), [0, 2, 4], "decoder.blocks.0.hook_resid_post")
    large = sweep(4 * torch.rand(3, 5, generator=g) - 2, [0, 2, 4], "decoder.blocks.1.hook_resid_post")
    baseline = {0: 0.5, 2: -1.0, 4: 2.0}
    fig = plot_sweeps([small, large], baseline=baseline, titles=["block 0", "block 1"], label="logit diff")
    panels = fig.axes[:2]
    assert [p.get_title() for p in panels] == ["block 0", "block 1"]
    shift = torch.tensor([0.5, -1.0, 2.0])[:, None]
    drawn = [torch.tensor(p.get_images()[0].get_array().tolist()) for p in panels]
    torch.testing.assert_close(drawn[0], small.values - shift)
    torch.testing.assert_close(drawn[1], large.values - shift)
    bound = max(float(d.abs().max()) for d in drawn)
    assert all(p.get_images()[0].get_clim() == (-bound, bound) for p in panels)
    assert len(fig.axes) == 3 and "baseline" in fig.axes[2].get_ylabel()  # one colour bar for both
    assert_saves(fig, tmp_path, "sweeps")
    # a baseline per sweep (None: drawn as is); without a baseline each plot_sweep keeps its own scale
    fig = plot_sweeps([small, large], baseline=[None, [0.0, 0.0, 1.0, 0.0, 3.0]])
    torch.testing.assert_close(torch.tensor(fig.axes[0].get_images()[0].get_array().tolist()), small.values)
    torch.testing.assert_close(
        torch.tensor(fig.axes[1].get_images()[0].get_array().tolist()),
        large.values - torch.tensor([0.0, 1.0, 3.0])[:, None],
    )
    alone = plot_sweep(small)
    assert image(alone).get_clim() == (-float(small.values.abs().max()), float(small.values.abs().max()))


def test_sweep_baseline_refusals():
    values = torch.zeros(2, 3)
    with pytest.raises(KeyError, match="no value for step 2"):
        plot_sweep(sweep(values, [0, 2], "h"), baseline={0: 1.0})
    with pytest.raises(KeyError, match="none for step 2"):
        plot_sweep(sweep(values, [0, 2], "h"), baseline=[1.0])
    by_layer = SweepResult(values, ("layer", "position"), {"layer": [0, 1], "position": [0, 1, 2]})
    with pytest.raises(ValueError, match="needs a sweep over steps"):
        plot_sweep(by_layer, baseline=[1.0])
    with pytest.raises(ValueError, match="2 titles for 1 sweeps"):
        plot_sweeps([by_layer], titles=["a", "b"])
