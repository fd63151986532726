"""Heatmaps of patching sweeps."""

from __future__ import annotations

from typing import TYPE_CHECKING

from diffusionlens.viz._common import finish_figure, pyplot

if TYPE_CHECKING:
    from diffusionlens.patching.sweep import SweepResult


def plot_sweep(result: SweepResult, ax=None, title: str | None = None):
    """Heatmap of a sweep: rows are the first axis, columns the second; returns the Figure."""
    plt = pyplot()
    if ax is None:
        fig, ax = plt.subplots(
            figsize=(max(4, 0.25 * result.values.shape[1] + 2), max(3, 0.3 * result.values.shape[0] + 1.5))
        )
    else:
        fig = ax.figure
    values = result.values.float()
    bound = float(values.abs().max()) or 1.0
    image = ax.imshow(values.numpy(), cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto", interpolation="nearest")
    rows, cols = result.axes
    ax.set_ylabel(rows)
    ax.set_xlabel(cols)
    ax.set_yticks(range(len(result.labels[rows])), [str(v) for v in result.labels[rows]])
    step = max(1, len(result.labels[cols]) // 24)
    ax.set_xticks(range(0, len(result.labels[cols]), step), [str(v) for v in result.labels[cols]][::step])
    fig.colorbar(image, ax=ax, label="metric")
    return finish_figure(fig, ax, title or f"{result.metadata.get('hook', '')} ({result.metadata.get('mode', '')})")
