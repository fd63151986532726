"""`hook.ctx`: TransformerLens' per-hook-point dict that also reads where in a generation we are.

TransformerLens gives every HookPoint its own `ctx` dict, so a forward hook can leave state for the
backward hook on the same point (`hook.ctx["act"] = x`), and `reset_hooks()` clears it. diffusionlens
also needs `hook.ctx.step`, `.canvas` and `.t`, which belong to the whole model (one `HookContext`
that the generation loop updates). `HookPointContext` is both: the dict is this point's own, the
three attributes are read-only views of the shared context, so existing `hook.ctx.step` code keeps
working and a hook can never desynchronise the step for the others by writing it. The shared context
keeps its values per thread; the dict itself is the point's, one for all threads.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class _SharedContext(Protocol):
    step: int | None
    canvas: int
    t: int | None


class HookPointContext(dict):
    """One hook point's scratch dict, plus read-only `step`, `canvas`, `t` from the model's context."""

    def __init__(self, shared: _SharedContext) -> None:
        super().__init__()
        # Set through object.__setattr__: __setattr__ below refuses the generation attributes only.
        object.__setattr__(self, "shared", shared)

    @property
    def step(self) -> int | None:
        """0-based denoising step within the canvas; None outside denoising (e.g. in the encoder)."""
        return self.shared.step

    @property
    def canvas(self) -> int:
        """Index of the canvas in a multi-canvas generation (0 for a single forward pass)."""
        return self.shared.canvas

    @property
    def t(self) -> int | None:
        """The reference implementation's `cur_step`, counting down from max_denoising_steps to 1."""
        return self.shared.t

    def clear(self) -> None:
        """Empty the dict and drop any attribute a hook set (`hook.ctx.saved = x`), so that neither
        outlives a `reset_hooks()` nor keeps its tensor alive."""
        super().clear()
        for name in [name for name in vars(self) if name != "shared"]:
            object.__delattr__(self, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("step", "canvas", "t", "shared"):
            raise AttributeError(
                f"hook.ctx.{name} is read-only: it is the model's generation context. Store your own state "
                f"as hook.ctx[{name!r}] = ..., or set model.hook_ctx.{name} to move the whole model's context"
            )
        super().__setattr__(name, value)

    def __reduce__(self) -> tuple:
        # dict subclasses pickle their items but not object.__setattr__ state reliably; rebuild both.
        return (_rebuild, (self.shared, dict(self)))

    def __repr__(self) -> str:
        return f"HookPointContext(step={self.step}, canvas={self.canvas}, t={self.t}, {dict.__repr__(self)})"


def _rebuild(shared: _SharedContext, items: dict) -> HookPointContext:
    ctx = HookPointContext(shared)
    ctx.update(items)
    return ctx
