"""Figures of one canvas's denoising trajectory: tokens per step, entropy, commit order."""

from __future__ import annotations

from typing import Any

import torch

from diffusionlens.sampling.trace import TOKEN_FIELDS, CanvasTrace, DenoisingTrace
from diffusionlens.viz._common import (
    RowView,
    TokenDecoder,
    finish_figure,
    new_axes,
    no_math,
    token_texts,
    visible,
)

_ACCEPTED_COLOUR = "#7fc97f"
_REJECTED_COLOUR = "#eeeeee"


def _position_ticks(ax, chosen: list[int], labels: list[str] | None, axis: str = "x") -> None:
    stride = max(1, len(chosen) // 64)
    ticks = list(range(0, len(chosen), stride))
    names = [f"{chosen[i]}" if labels is None else f"{chosen[i]}\n{visible(labels[i])}" for i in ticks]
    if axis == "x":
        ax.set_xticks(ticks, names, fontsize=7)
        no_math(ax.get_xticklabels())
    else:
        ax.set_yticks(ticks, names, fontsize=7)
        no_math(ax.get_yticklabels())


def plot_token_grid(
    trace: DenoisingTrace | CanvasTrace,
    tokenizer: TokenDecoder = None,
    *,
    tokens: str = "argmax",
    ax=None,
    title: str | None = None,
    **selection: Any,
):
    """Step × position grid with each step's token text in its cell; green cells were accepted that step.

    `tokens` picks which tokens are written: "argmax" (the draft answer, default), "sampled",
    "input_canvas" or "next_canvas". The cell where each position committed (`commit_step`) gets a
    black outline. Steps run from the first to the one after which the row stopped. `selection` picks
    what is drawn, as `RowView.select` takes it: `canvas` and batch `row` (0 each by default), and
    `positions` (a list, range or slice of canvas positions) and `max_positions` to crop the columns.
    Returns the Figure; its axes hold one text per cell, in row-major (step, position) order.
    """
    if tokens not in TOKEN_FIELDS:
        raise ValueError(f"tokens must be one of {tuple(TOKEN_FIELDS)}, got {tokens!r}")
    view = RowView.select(trace, **selection)
    chosen, n_steps = view.positions, view.n_steps
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch, Rectangle

    ids = view.per_step(tokens)
    accepted = view.per_step("accepted")
    commits = view.commit_steps()
    fig, ax = new_axes(ax, (max(4.0, 0.32 * len(chosen) + 1.5), max(2.5, 0.32 * n_steps + 1.6)))
    ax.imshow(
        accepted.int().numpy(),
        cmap=ListedColormap([_REJECTED_COLOUR, _ACCEPTED_COLOUR]),
        vmin=0,
        vmax=1,
        aspect="auto",
        interpolation="nearest",
    )
    texts = token_texts(tokenizer, ids.flatten().tolist())
    fontsize = 7 if len(chosen) <= 64 else 5
    for k, text in enumerate(texts):
        step, col = divmod(k, len(chosen))
        size = fontsize if len(text) <= 3 else fontsize - 1.5
        ax.text(col, step, visible(text), ha="center", va="center", fontsize=size, parse_math=False)
    for col, step in enumerate(commits.tolist()):
        if step < n_steps:
            ax.add_patch(Rectangle((col - 0.5, step - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.0))
    _position_ticks(ax, chosen, None)
    ax.set_yticks(range(n_steps), [str(s) for s in range(n_steps)], fontsize=7)
    ax.set_xlabel("canvas position")
    ax.set_ylabel("step")
    ax.legend(
        handles=[
            Patch(facecolor=_ACCEPTED_COLOUR, label="accepted this step"),
            Patch(facecolor=_REJECTED_COLOUR, label="not accepted"),
            Patch(facecolor="none", edgecolor="black", label="commit step"),
        ],
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=7,
        frameon=False,
    )
    return finish_figure(fig, ax, title or f"{tokens} per step (row {view.row})")


def plot_entropy(
    trace: DenoisingTrace | CanvasTrace,
    tokenizer: TokenDecoder = None,
    *,
    mark_accepted: bool = True,
    ax=None,
    title: str | None = None,
    **selection: Any,
):
    """Heatmap of the per-position entropy (nats, of the temperature-scaled logits), step × position.

    With `mark_accepted`, a white dot marks each position accepted at that step. With a tokenizer, the
    x tick labels carry the final token of each position. `selection` (`canvas`, `row`, `positions`,
    `max_positions`) picks the row and crops the columns, as in `plot_token_grid`.
    Returns the Figure (the heatmap's axes and its colorbar's).
    """
    view = RowView.select(trace, **selection)
    chosen, n_steps = view.positions, view.n_steps
    values = view.per_step("entropy").float()
    fig, ax = new_axes(ax, (max(4.0, 0.25 * len(chosen) + 2.5), max(2.5, 0.25 * n_steps + 1.8)))
    image = ax.imshow(values.numpy(), cmap="magma", aspect="auto", interpolation="nearest", vmin=0)
    if mark_accepted:
        steps, cols = torch.nonzero(view.per_step("accepted"), as_tuple=True)
        ax.scatter(cols.numpy(), steps.numpy(), s=6, c="white", marker="o", linewidths=0, label="accepted")
    final = token_texts(tokenizer, view.final().tolist()) if tokenizer is not None else None
    _position_ticks(ax, chosen, final)
    stride = max(1, n_steps // 24)
    ax.set_yticks(range(0, n_steps, stride), [str(s) for s in range(0, n_steps, stride)], fontsize=7)
    ax.set_xlabel("canvas position" + (" / final token" if final else ""))
    ax.set_ylabel("step")
    fig.colorbar(image, ax=ax, label="entropy (nats)")
    return finish_figure(fig, ax, title or f"entropy per step and position (row {view.row})")


def plot_commit_order(
    trace: DenoisingTrace | CanvasTrace,
    tokenizer: TokenDecoder = None,
    *,
    ax=None,
    title: str | None = None,
    **selection: Any,
):
    """Commit step per position (the step after which its argmax never changed), labelled with the
    position's final token: a stem plot, position on x, commit step on y.

    `selection` (`canvas`, `row`, `positions`, `max_positions`) picks the row and crops the positions
    shown, as in `plot_token_grid`. Returns the Figure; its axes hold one text
    (the final token) per position shown.
    """
    view = RowView.select(trace, **selection)
    chosen, n_steps = view.positions, view.n_steps
    commits = view.commit_steps()
    final = token_texts(tokenizer, view.final().tolist())
    from matplotlib.ticker import MaxNLocator

    fig, ax = new_axes(ax, (max(4.0, 0.28 * len(chosen) + 1.5), 3.2))
    xs = list(range(len(chosen)))
    ax.vlines(xs, 0, commits.numpy(), colors="#bbbbbb", linewidth=1)
    ax.scatter(xs, commits.numpy(), c=commits.numpy(), cmap="viridis", vmin=0, vmax=max(1, n_steps - 1), zorder=3)
    for x, (text, step) in enumerate(zip(final, commits.tolist(), strict=True)):
        ax.text(x, step + 0.25, visible(text), ha="center", va="bottom", fontsize=7, parse_math=False)
    _position_ticks(ax, chosen, None)
    ax.set_ylim(-0.5, max(1, int(commits.max()) + 1) + 0.2)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("canvas position")
    ax.set_ylabel("commit step")
    return finish_figure(fig, ax, title or f"commit step per position, labelled with the final token (row {view.row})")
