"""Shared helpers for figures and the viewer: pyplot on the Agg backend, token text, position crops."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int

from diffusionlens.cache.selectors import Selector, ordered_indices
from diffusionlens.sampling.trace import CanvasTrace, DenoisingTrace

#: Anything that turns token ids into text: an object with `decode(list[int]) -> str` (a transformers
#: tokenizer), a callable `id -> str`, or None (the id itself is shown).
TokenDecoder = Any

_VISIBLE = {" ": "␣", "\n": "⏎", "\t": "⇥", "": "∅"}


def pyplot():
    """matplotlib.pyplot on the headless Agg backend (unless a backend was already chosen)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install 'diffusionlens[viz]'") from err
    return plt


def token_texts(tokenizer: TokenDecoder, ids: Iterable[int]) -> list[str]:
    """The text of each token id, decoded one id at a time (special tokens included)."""
    ids = [int(i) for i in ids]
    cache: dict[int, str] = {}
    for i in ids:
        if i not in cache:
            cache[i] = _decode_one(tokenizer, i)
    return [cache[i] for i in ids]


def _decode_one(tokenizer: TokenDecoder, token: int) -> str:
    if tokenizer is None:
        return str(token)
    if hasattr(tokenizer, "decode"):
        return str(tokenizer.decode([token]))
    if callable(tokenizer):
        return str(tokenizer(token))
    raise TypeError(f"tokenizer must have decode(ids), be a callable id -> str, or be None; got {type(tokenizer)}")


def visible(text: str) -> str:
    """Token text for a figure cell: whitespace and empty strings drawn as visible symbols."""
    if text in _VISIBLE:
        return _VISIBLE[text]
    return text.replace("\n", "⏎").replace("\t", "⇥")


def canvas_trace(trace: DenoisingTrace | CanvasTrace, canvas: int = 0) -> CanvasTrace:
    """The CanvasTrace to draw: `trace` itself, or canvas `canvas` of a DenoisingTrace."""
    if isinstance(trace, DenoisingTrace):
        if not 0 <= canvas < len(trace):
            raise IndexError(f"canvas {canvas} out of range: the trace has {len(trace)} canvases")
        return trace[canvas]
    if isinstance(trace, CanvasTrace):
        return trace
    raise TypeError(f"expected a DenoisingTrace or CanvasTrace, got {type(trace)}")


def on_cpu(trace: CanvasTrace) -> CanvasTrace:
    """A CPU copy of `trace` (traces are small), so plotting works on traces generated on an accelerator."""
    return CanvasTrace(**{name: value.detach().cpu() for name, value in trace.tensors().items()})


def check_row(trace: CanvasTrace, row: int) -> int:
    """Validate a batch row index."""
    batch = trace.input_canvas.shape[1]
    if not 0 <= row < batch:
        raise IndexError(f"row {row} out of range: the trace has batch size {batch}")
    return row


def row_steps(trace: CanvasTrace, row: int) -> int:
    """Steps that changed `row`: up to and including the step after which it stopped."""
    return int(trace.stop_step()[row]) + 1


def select_positions(length: int, positions: Selector, max_positions: int | None) -> list[int]:
    """Canvas positions to draw: all, or what the selector `positions` picks (in its order), then cropped to
    the first `max_positions`."""
    chosen = ordered_indices(positions, length, "positions", "canvas positions") or list(range(length))
    if max_positions is not None:
        if max_positions < 1:
            raise ValueError(f"max_positions must be >= 1, got {max_positions}")
        chosen = chosen[:max_positions]
    return chosen


@dataclass(frozen=True)
class RowView:
    """What every trajectory figure and the viewer draw from: one batch row of one canvas (on the CPU),
    its steps up to the one after which it stopped, and the canvas positions shown."""

    trace: CanvasTrace
    row: int
    positions: list[int]
    n_steps: int

    @classmethod
    def select(
        cls,
        trace: DenoisingTrace | CanvasTrace,
        canvas: int = 0,
        row: int = 0,
        positions: Selector = None,
        max_positions: int | None = None,
    ) -> RowView:
        """Check `canvas`, `row` and `positions` against the trace and pick them out."""
        chosen = on_cpu(canvas_trace(trace, canvas))
        check_row(chosen, row)
        shown = select_positions(chosen.input_canvas.shape[-1], positions, max_positions)
        return cls(chosen, row, shown, row_steps(chosen, row))

    @property
    def index(self) -> Int[torch.Tensor, " pos"]:
        return torch.tensor(self.positions)

    def per_step(self, field: str) -> torch.Tensor:
        """A `[step, batch, canvas]` field of the trace as `[step, pos]` for this row and these positions."""
        return getattr(self.trace, field)[: self.n_steps, self.row][:, self.index]

    def commit_steps(self) -> Int[torch.Tensor, " pos"]:
        return self.trace.commit_step()[self.row][self.index]

    def final(self) -> Int[torch.Tensor, " pos"]:
        return self.trace.final[self.row][self.index]


def new_axes(ax, figsize: tuple[float, float]):
    """`(fig, ax)`: a new figure of `figsize` when `ax` is None, else `ax` and its figure."""
    if ax is None:
        return pyplot().subplots(figsize=figsize)
    return ax.figure, ax


def finish_figure(fig, ax, title: str):
    """Title `ax` (the figures' small title size), tighten `fig`'s layout and return `fig`."""
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def finish_panels(fig, title: str = "", path=None):
    """Give a multi-panel `fig` its overall `title` (if any), tighten its layout, save it to `path` (if any)
    and return it."""
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def no_math(texts: Iterable[Any]) -> None:
    """Draw matplotlib Text objects literally (a `$` in a token must not start mathtext)."""
    for text in texts:
        text.set_parse_math(False)
