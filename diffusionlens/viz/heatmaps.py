"""Heatmaps of patching sweeps: one sweep, or several on one colour scale, optionally against a per-step
baseline (each cell minus the baseline of its step)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float

from diffusionlens.viz._common import finish_figure, pyplot

if TYPE_CHECKING:
    from diffusionlens.patching.sweep import SweepResult

StepBaseline = Mapping[int, float] | Sequence[float] | torch.Tensor
"""A value per denoising step: a mapping step → value, or a sequence / 1-D tensor indexed by step number."""


def sweep_values(result: SweepResult, baseline: StepBaseline | None = None) -> Float[torch.Tensor, "rows cols"]:
    """The sweep's values as drawn: minus `baseline[step]` in every cell of that step when a baseline is
    given (e.g. the clean run's metric at each step), so a cell shows what the patch changed at its step."""
    values = result.values.float()
    if values.dim() != 2:
        raise ValueError(f"a heatmap draws a two-axis sweep; this one has axes {result.axes}")
    if baseline is None:
        return values
    if "step" not in result.axes:
        raise ValueError(f"a per-step baseline needs a sweep over steps; this one is over {result.axes}")
    steps = [int(s) for s in result.labels["step"]]
    by_step = [_baseline_at(baseline, s) for s in steps]
    shape = [1, 1]
    shape[result.axes.index("step")] = len(steps)
    return values - torch.tensor(by_step, dtype=values.dtype).view(shape)


def _baseline_at(baseline: StepBaseline, step: int) -> float:
    if isinstance(baseline, Mapping):
        if step not in baseline:
            raise KeyError(f"the baseline has no value for step {step}; it covers steps {sorted(baseline)}")
        return float(baseline[step])
    if not 0 <= step < len(baseline):
        raise KeyError(f"the baseline has {len(baseline)} values (steps 0..{len(baseline) - 1}), none for step {step}")
    return float(baseline[step])


def plot_sweep(
    result: SweepResult,
    ax=None,
    title: str | None = None,
    *,
    baseline: StepBaseline | None = None,
    bound: float | None = None,
    colorbar: bool = True,
    label: str = "metric",
):
    """Heatmap of a sweep: rows are the first axis, columns the second; returns the Figure.

    `baseline`: a value per step subtracted from every cell of that step (`sweep_values`). `bound`: the
    colour scale's half-width (default: the largest |value| drawn), centred on 0; `plot_sweeps` passes
    one bound to several sweeps."""
    values = sweep_values(result, baseline)
    plt = pyplot()
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(4, 0.25 * values.shape[1] + 2), max(3, 0.3 * values.shape[0] + 1.5)))
    else:
        fig = ax.figure
    bound = bound if bound is not None else (float(values.abs().max()) or 1.0)
    image = ax.imshow(values.numpy(), cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto", interpolation="nearest")
    rows, cols = result.axes
    ax.set_ylabel(rows)
    ax.set_xlabel(cols)
    ax.set_yticks(range(len(result.labels[rows])), [str(v) for v in result.labels[rows]])
    step = max(1, len(result.labels[cols]) // 24)
    ax.set_xticks(range(0, len(result.labels[cols]), step), [str(v) for v in result.labels[cols]][::step])
    if colorbar:
        fig.colorbar(image, ax=ax, label=label if baseline is None else f"{label} - baseline at its step")
    return finish_figure(fig, ax, title or f"{result.metadata.get('hook', '')} ({result.metadata.get('mode', '')})")


def plot_sweeps(
    results: Sequence[SweepResult],
    *,
    baseline: StepBaseline | Sequence[StepBaseline | None] | None = None,
    titles: Sequence[str] | None = None,
    label: str = "metric",
    ncols: int | None = None,
):
    """Several sweeps side by side on one colour scale (half-width: the largest |value| drawn in any of
    them) with one colour bar. `baseline`: one per-step baseline for all sweeps, or a list of one per
    sweep (None for none). Returns the Figure; its axes are the sweeps in order, then the colour bar."""
    results = list(results)
    if not results:
        raise ValueError("give at least one sweep")
    baselines = _per_sweep(baseline, len(results))
    if titles is not None and len(titles) != len(results):
        raise ValueError(f"{len(titles)} titles for {len(results)} sweeps")
    bound = max(float(sweep_values(r, b).abs().max()) for r, b in zip(results, baselines, strict=True)) or 1.0
    ncols = ncols or len(results)
    nrows = -(-len(results) // ncols)
    width = max(4, 0.25 * results[0].values.shape[-1] + 2)
    height = max(3, 0.3 * results[0].values.shape[0] + 1.5)
    fig, grid = pyplot().subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    panels = grid.flatten().tolist()
    for i, (result, panel) in enumerate(zip(results, panels, strict=False)):
        title = titles[i] if titles is not None else None
        plot_sweep(result, ax=panel, title=title, baseline=baselines[i], bound=bound, colorbar=False)
    for panel in panels[len(results) :]:
        panel.remove()
    shown = label if all(b is None for b in baselines) else f"{label} - baseline at its step"
    fig.colorbar(panels[0].images[0], ax=panels[: len(results)], label=shown)
    return fig


def _per_sweep(baseline: StepBaseline | Sequence[StepBaseline | None] | None, n: int) -> list[StepBaseline | None]:
    """One baseline per sweep: a list of n entries each None, a mapping, a sequence or a tensor is one
    each; anything else is one baseline shared by all."""
    if isinstance(baseline, Sequence) and not isinstance(baseline, str) and len(baseline) == n:
        if all(
            b is None or isinstance(b, (Mapping, Sequence)) or (torch.is_tensor(b) and b.dim() == 1) for b in baseline
        ):
            return list(baseline)
    return [baseline] * n
