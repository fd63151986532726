"""Figures for features/: probe accuracy by layer and denoising step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from diffusionlens.viz._common import finish_figure, new_axes

if TYPE_CHECKING:
    from diffusionlens.features.probes import ProbeResult


def plot_probe_accuracy(result: ProbeResult, *, names: Sequence[str] | None = None, ax=None, title: str | None = None):
    """Hook × step heatmap of held-out probe scores, each cell labelled, with the majority baseline
    per step written under the step axis (logistic probes). Returns the Figure."""
    names = list(names) if names is not None else result.hooks
    fig, ax = new_axes(ax, (1.2 + 0.9 * len(result.steps), 0.9 + 0.45 * len(names)))
    score = result.score.numpy()
    image = ax.imshow(score, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for (i, j), value in (
        (ij, score[ij]) for ij in ((i, j) for i in range(len(names)) for j in range(len(result.steps)))
    ):
        ax.text(
            j,
            i,
            "–" if value != value else f"{value:.2f}",
            ha="center",
            va="center",
            color="white" if value < 0.6 else "black",
            fontsize=8,
        )
    labels = [f"step {s}" for s in result.steps]
    if result.kind == "logistic":
        labels = [
            f"{lab}\nbase {'–' if b != b else f'{b:.2f}'}"
            for lab, b in zip(labels, result.baseline.tolist(), strict=True)
        ]
    ax.set_xticks(range(len(result.steps)), labels, fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    fig.colorbar(image, ax=ax, label="held-out accuracy" if result.kind == "logistic" else "held-out R²")
    return finish_figure(fig, ax, title or "probe by layer and denoising step")
