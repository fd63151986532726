"""Logit-lens figures: the top token at every decoder layer and canvas position at one denoising step, and
the lens of chosen tokens at one position by step and layer."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from diffusionlens.cache.selectors import Selector
from diffusionlens.viz._common import (
    TokenDecoder,
    finish_figure,
    new_axes,
    no_math,
    select_positions,
    token_texts,
    visible,
)

if TYPE_CHECKING:
    from diffusionlens.analysis.logit_lens import LensTokenScores
    from diffusionlens.cache.denoising import DenoisingCache


def plot_logit_lens(
    cache: DenoisingCache,
    step: int,
    tokenizer: TokenDecoder = None,
    *,
    canvas: int = 0,
    row: int = 0,
    positions: Selector = None,
    max_positions: int | None = None,
    ax=None,
    title: str | None = None,
):
    """Layer × position grid of the logit lens at `step`: each cell shows the top token read off the
    residual stream (through the final norm and the tied head) and is coloured by its probability.

    Uses `cache.logit_lens(step, canvas)` (`[layers + 1, batch, pos, vocab]`), so the cache needs every
    `decoder.blocks.*.hook_resid_pre` and the last block's `hook_resid_post` at that step. Rows are the
    input to each block, then the output of the last block. `positions` are canvas positions (when the
    cache was recorded with a positions filter, only recorded ones can be drawn); `max_positions` crops.
    Returns the Figure; its axes hold one text per cell, row-major (layer, position).
    """
    with torch.no_grad():
        lens = cache.logit_lens(step, canvas).detach().float().cpu()
    n_rows, batch, width = lens.shape[:3]
    if not 0 <= row < batch:
        raise IndexError(f"row {row} out of range: the cache has batch size {batch}")
    recorded = list(range(width)) if cache.positions is None else list(cache.positions)
    if positions is None:
        chosen = select_positions(len(recorded), None, max_positions)
        chosen = [recorded[i] for i in chosen]
    else:
        chosen = select_positions(cache.model.cfg.canvas_length, positions, max_positions)
        missing = [p for p in chosen if p not in recorded]
        if missing:
            raise ValueError(f"positions {missing} were not recorded in this cache (recorded: {recorded})")
    columns = torch.tensor([recorded.index(p) for p in chosen])
    probs = torch.softmax(lens[:, row][:, columns], dim=-1)
    top_prob, top_token = probs.max(-1)
    fig, ax = new_axes(ax, (max(4.0, 0.45 * len(chosen) + 2.5), max(2.5, 0.36 * n_rows + 1.6)))
    image = ax.imshow(top_prob.numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    texts = token_texts(tokenizer, top_token.flatten().tolist())
    for k, text in enumerate(texts):
        layer, col = divmod(k, len(chosen))
        dark = float(top_prob[layer, col]) > 0.6
        ax.text(
            col,
            layer,
            visible(text),
            ha="center",
            va="center",
            fontsize=7 if len(text) <= 3 else 5.5,
            color="white" if dark else "black",
            parse_math=False,
        )
    stride = max(1, len(chosen) // 64)
    ax.set_xticks(range(0, len(chosen), stride), [str(p) for p in chosen[::stride]], fontsize=7)
    labels = [f"block {i} in" for i in range(n_rows - 1)] + [f"block {n_rows - 2} out"]
    ax.set_yticks(range(n_rows), labels, fontsize=7)
    no_math(ax.get_yticklabels())
    ax.set_xlabel("canvas position")
    ax.set_ylabel("residual stream")
    fig.colorbar(image, ax=ax, label="top-token probability")
    return finish_figure(fig, ax, title or f"logit lens at step {step} (canvas {canvas}, row {row})")


def plot_logit_lens_by_step(
    scores: LensTokenScores, tokenizer: TokenDecoder = None, *, ax=None, title: str | None = None
):
    """Step × layer grid of the logit lens of chosen tokens at one canvas position, drawn from
    `diffusionlens.analysis.logit_lens_token_scores(cache, position, tokens, metric=...)`: the probability of
    the tokens (`metric="prob"`, colour 0 … 1) or the logit difference of two (`metric="logit_diff"`, a
    diverging scale centred on 0). Rows are the recorded steps, columns the residual before each block and
    after the last. Returns the Figure (`fig.lens_scores` is `scores`).
    """
    values = scores.values.detach().float().cpu()
    n_steps, n_layers = values.shape
    fig, ax = new_axes(ax, (max(4.0, 0.5 * n_layers + 3.0), max(2.5, 0.3 * n_steps + 1.6)))
    if scores.metric == "prob":
        image = ax.imshow(values.numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    else:
        bound = float(values.abs().max()) or 1.0
        image = ax.imshow(
            values.numpy(), cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto", interpolation="nearest"
        )  # fmt: skip
    names = [visible(text) for text in token_texts(tokenizer, scores.tokens)]
    layers = [f"block {i} in" for i in range(n_layers - 1)] + [f"block {n_layers - 2} out"]
    ax.set_xticks(range(n_layers), layers, fontsize=7, rotation=45, ha="right")
    stride = max(1, n_steps // 32)
    ax.set_yticks(range(0, n_steps, stride), [str(s) for s in scores.steps[::stride]], fontsize=7)
    no_math(ax.get_xticklabels())
    ax.set_xlabel("residual stream")
    ax.set_ylabel("denoising step")
    if scores.metric == "prob":
        label = f"P({' or '.join(names)})"
    else:
        label = f"logit({names[0]}) - logit({names[1]})"
    fig.colorbar(image, ax=ax, label=label.replace("$", r"\$"))
    fig.lens_scores = scores
    where = f"position {scores.position} by step (canvas {scores.canvas}, row {scores.row})"
    return finish_figure(fig, ax, title or f"logit lens at {where}")
