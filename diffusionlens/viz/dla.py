"""Direct logit attribution across denoising steps as a step × component heatmap."""

from __future__ import annotations

from typing import TYPE_CHECKING

from diffusionlens.viz._common import TokenDecoder, new_axes, no_math, token_texts

if TYPE_CHECKING:
    from diffusionlens.analysis.dla import DLAByStep


def dla_title(dla: DLAByStep, tokenizer: TokenDecoder = None) -> str:
    """`'8' − '7' at position 0` (the target, the other token when given, the position)."""
    ids = [dla.target] if dla.other is None else [dla.target, dla.other]
    texts = [repr(t) for t in token_texts(tokenizer, ids)]
    return " − ".join(texts) + f" at position {dla.position}"


def plot_dla_by_step(dla: DLAByStep, tokenizer: TokenDecoder = None, ax=None, title: str | None = None):
    """Heatmap of `dla.attributions`: one row per step, one column per component (red writes the target,
    blue the other token), each row labelled with its logit (difference) before the soft-cap."""
    values = dla.attributions.float()
    fig, ax = new_axes(ax, (max(5.0, 0.35 * values.shape[1] + 2.5), max(2.5, 0.35 * values.shape[0] + 1.5)))
    bound = float(values.abs().max()) or 1.0
    image = ax.imshow(values.numpy(), cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto", interpolation="nearest")
    rows = [f"step {s} ({float(v):+.2f})" for s, v in zip(dla.steps, dla.logit, strict=True)]
    ax.set_yticks(range(len(dla.steps)), rows)
    ax.set_xticks(range(len(dla.labels)), dla.labels, rotation=90, fontsize=7)
    ax.set_xlabel("component")
    no_math([ax.set_title(title or "direct logit attribution: " + dla_title(dla, tokenizer), fontsize=9)])
    fig.colorbar(image, ax=ax, label="logit (difference) before soft-cap")
    fig.tight_layout()
    return fig
