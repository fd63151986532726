"""`HookContext`: where in a generation a forward pass runs (denoising step, canvas, `t`).

One instance is shared by every hook point of a model; the generation loop sets it before each pass
and each point's `hook.ctx` (`hooks/point_context.py`) reads it. Its values are per thread, so two
threads generating with one model each read their own step.
"""

from __future__ import annotations

import threading
from typing import Any


class _ContextValues(threading.local):
    """`HookContext`'s values, one set per thread (each new thread starts from the constructor's)."""

    def __init__(self, step: int | None, canvas: int, t: int | None) -> None:
        self.step, self.canvas, self.t = step, canvas, t


class PerThreadValue:
    """A `HookContext` attribute kept in the calling thread's `_ContextValues`: read and written there."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, context: HookContext | None, owner: type) -> Any:
        return self if context is None else getattr(context._values, self.name)

    def __set__(self, context: HookContext, value: Any) -> None:
        setattr(context._values, self.name, value)


class HookContext:
    """Where in a generation a forward pass runs; one instance is shared by all hook points.

    step: 0-based denoising step in execution order (None outside denoising, e.g. in the encoder).
    canvas: index of the canvas in a multi-canvas generation (0 for a single forward pass).
    t: the reference implementation's `cur_step`, counting down from `max_denoising_steps` to 1.

    The values are per thread: a generation in one thread sets them for its own hooks only, so two
    threads generating with one model each read their own step.
    """

    __slots__ = ("_values",)

    def __init__(self, step: int | None = None, canvas: int = 0, t: int | None = None) -> None:
        self._values = _ContextValues(step, canvas, t)

    step = PerThreadValue()
    canvas = PerThreadValue()
    t = PerThreadValue()

    def reset(self) -> None:
        values = self._values
        values.step, values.canvas, values.t = None, 0, None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HookContext):
            return NotImplemented
        return (self.step, self.canvas, self.t) == (other.step, other.canvas, other.t)

    __hash__ = None  # type: ignore[assignment]  # mutable, as the dataclass it replaces

    def __repr__(self) -> str:
        return f"HookContext(step={self.step!r}, canvas={self.canvas!r}, t={self.t!r})"

    def __reduce__(self) -> tuple:
        # A threading.local does not pickle; a copy carries this thread's values.
        return (HookContext, (self.step, self.canvas, self.t))
