"""Direct logit attribution across denoising steps as a step × component heatmap."""

from __future__ import annotations

from typing import TYPE_CHECKING

from diffusionlens.viz._common import TokenDecoder, new_axes, no_math, token_texts

if TYPE_CHECKING:
    from diffusionlens.analysis.dla import DLAByStep

#: Beyond this many components, the figure and the viewer show the largest ones plus a `rest` column
#: (`DLAByStep.keep_top`): a component-granularity table of the real model has thousands.
MAX_COMPONENTS = 60


def dla_title(dla: DLAByStep, tokenizer: TokenDecoder = None) -> str:
    """`'8' − '7' at position 0` (the target, the other token when given, the position)."""
    ids = [dla.target] if dla.other is None else [dla.target, dla.other]
    texts = [repr(t) for t in token_texts(tokenizer, ids)]
    return " − ".join(texts) + f" at position {dla.position}"


def shown_components(dla: DLAByStep, max_components: int | None) -> tuple[DLAByStep, str]:
    """The table a figure or the viewer shows (at most `max_components` components plus `rest`), and a
    note saying what was left out ('' when nothing was)."""
    if max_components is None or len(dla.labels) <= max_components:
        return dla, ""
    shown = dla.keep_top(max_components)
    return shown, f" (largest {max_components} of {len(dla.labels)} components; 'rest' sums the others)"


def plot_dla_by_step(
    dla: DLAByStep,
    tokenizer: TokenDecoder = None,
    ax=None,
    title: str | None = None,
    max_components: int | None = MAX_COMPONENTS,
):
    """Heatmap of `dla.attributions`: one row per step, one column per component (red writes the target,
    blue the other token), each row labelled with its logit (difference) before the soft-cap. Works at
    either granularity of `dla_by_step`; thin lines separate blocks. A table of more than
    `max_components` components (None: no limit) shows the largest (by peak |attribution| over the
    steps) and a `rest` column, so each row still sums to its logit."""
    dla, note = shown_components(dla, max_components)
    values = dla.attributions.float()
    width = min(30.0, max(5.0, 0.35 * values.shape[1] + 2.5))
    fig, ax = new_axes(ax, (width, max(2.5, 0.35 * values.shape[0] + 1.5)))
    bound = float(values.abs().max()) or 1.0
    image = ax.imshow(values.numpy(), cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto", interpolation="nearest")
    rows = [f"step {s} ({float(v):+.2f})" for s, v in zip(dla.steps, dla.logit, strict=True)]
    ax.set_yticks(range(len(dla.steps)), rows)
    ax.set_xticks(range(len(dla.labels)), dla.labels, rotation=90, fontsize=7)
    layers = dla.layers
    for i in range(1, len(layers)):
        if layers[i] is not None and layers[i] != layers[i - 1]:
            ax.axvline(i - 0.5, color="0.3", linewidth=0.5)
    ax.set_xlabel("component")
    heading = title or "direct logit attribution: " + dla_title(dla, tokenizer) + note
    no_math([ax.set_title(heading, fontsize=9)])
    fig.colorbar(image, ax=ax, label="logit (difference) before soft-cap")
    fig.tight_layout()
    return fig
