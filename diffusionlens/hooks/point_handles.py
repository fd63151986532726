"""TransformerLens's per-point hook API on `HookPoint`: `add_hook`, `remove_hooks`, `has_hooks` and the
`fwd_hooks` / `bwd_hooks` lists.

Hooks added here are model-level hooks of that one point, the same lists `HookedRootModule.add_hook` fills
(`fwd_fns` / `bwd_fns`), so `model.reset_hooks()` removes them too. TransformerLens keeps torch handles;
here a point's hooks are plain functions, and `LensHandle` describes one of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

HookFn = Callable[..., Any]


@dataclass(frozen=True)
class LensHandle:
    """One hook on a point, as TransformerLens lists them: the function, whether it is permanent, and
    the context level it was added at (None: not added with a level)."""

    hook: HookFn
    is_permanent: bool = False
    context_level: int | None = None


def _directions(dir: str) -> tuple[str, ...]:
    if dir not in ("fwd", "bwd", "both"):
        raise ValueError(f"dir must be 'fwd', 'bwd' or 'both', got {dir!r}")
    return ("fwd", "bwd") if dir == "both" else (dir,)


def _flag(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def _take(pool: list, item: Any) -> bool:
    """Whether `item` is in `pool` (by identity), consuming one occurrence."""
    for i, candidate in enumerate(pool):
        if candidate is item:
            del pool[i]
            return True
    return False


class HookPointHandles:
    """Mixed into `HookPoint`: TransformerLens's hook methods of a single point.

    Each hook added here leaves a record `(dir, fn, is_permanent, level)`; a function on the point without
    one (added by `model.add_hook`) is listed from the point's `permanent_fns`, with no level.
    """

    fwd_fns: list[HookFn]
    bwd_fns: list[HookFn]
    permanent_fns: list[tuple[str, HookFn]]

    def _records(self) -> list[tuple[str, HookFn, bool, int | None]]:
        # Created on first use: points unpickled from before records existed have none.
        if "hook_records" not in self.__dict__:
            self.__dict__["hook_records"] = []
        return self.__dict__["hook_records"]

    def forget_removed_records(self) -> None:
        """Drop the records of hooks no longer on this point (after `model.reset_hooks()`)."""
        live = {"fwd": list(self.fwd_fns), "bwd": list(self.bwd_fns)}
        self._records()[:] = [record for record in self._records() if _take(live[record[0]], record[1])]

    def add_hook(
        self,
        hook: HookFn,
        dir: str = "fwd",
        is_permanent: bool = False,
        level: int | None = None,
        prepend: bool = False,
    ) -> None:
        """Attach `hook(tensor, hook_point)` to this point (TransformerLens's `HookPoint.add_hook`):
        `prepend` runs it before the hooks already here, `is_permanent` keeps it through `remove_hooks()`
        and `model.reset_hooks()`, `level` tags it so that `remove_hooks(level=...)` removes it alone."""
        if dir not in ("fwd", "bwd"):
            raise ValueError(f"dir must be 'fwd' or 'bwd', got {dir!r}")
        if not callable(hook):
            raise TypeError(f"a hook must be a function fn(tensor, hook) -> tensor | None, got {type(hook).__name__}")
        _flag(is_permanent, "is_permanent")
        _flag(prepend, "prepend")
        if level is not None and (isinstance(level, bool) or not isinstance(level, int)):
            raise TypeError(f"level must be an int or None, got {level!r}")
        fns = self.fwd_fns if dir == "fwd" else self.bwd_fns
        fns.insert(0, hook) if prepend else fns.append(hook)
        if is_permanent:
            self.permanent_fns.append((dir, hook))
        self._records().append((dir, hook, is_permanent, level))

    def thread_hooks(self, dir: str) -> list[HookFn]:  # HookPoint's: this thread's hooks in firing order
        raise NotImplementedError

    def _handles(self, dir: str, with_run_hooks: bool = True) -> list[LensHandle]:
        """The hooks of direction `dir` in firing order: with `with_run_hooks`, this thread's temporary
        ones (from `model.hooks()` / `run_with_hooks`) among them, as TransformerLens lists a context's hooks."""
        records = [(fn, permanent, level) for d, fn, permanent, level in self._records() if d == dir]
        unrecorded_permanent = [fn for d, fn in self.permanent_fns if d == dir]
        for fn, permanent, _ in records:
            if permanent:
                _take(unrecorded_permanent, fn)
        handles = []
        model_level = self.fwd_fns if dir == "fwd" else self.bwd_fns
        for fn in self.thread_hooks(dir) if with_run_hooks else model_level:
            index = next((i for i, record in enumerate(records) if record[0] is fn), None)
            if index is None:
                handles.append(LensHandle(fn, _take(unrecorded_permanent, fn), None))
            else:
                _, permanent, level = records.pop(index)
                handles.append(LensHandle(fn, permanent, level))
        return handles

    @property
    def fwd_hooks(self) -> list[LensHandle]:
        """This point's forward hooks in firing order, this thread's temporary ones included."""
        return self._handles("fwd")

    @property
    def bwd_hooks(self) -> list[LensHandle]:
        """This point's backward hooks in firing order, this thread's temporary ones included."""
        return self._handles("bwd")

    def remove_hooks(self, dir: str = "fwd", including_permanent: bool = False, level: int | None = None) -> None:
        """Remove this point's model-level hooks of direction `dir` ("fwd", "bwd" or "both"), as
        TransformerLens: permanent ones stay unless `including_permanent`; with `level`, only the hooks added
        at that level. A run's temporary hooks leave with their run (or `model.reset_hooks()`)."""
        _flag(including_permanent, "including_permanent")
        for direction in _directions(dir):
            kept = [
                h
                for h in self._handles(direction, with_run_hooks=False)
                if (h.is_permanent and not including_permanent) or (level is not None and h.context_level != level)
            ]
            fns = self.fwd_fns if direction == "fwd" else self.bwd_fns
            fns[:] = [h.hook for h in kept]
            others = [(d, fn) for d, fn in self.permanent_fns if d != direction]
            self.permanent_fns[:] = others + [(direction, h.hook) for h in kept if h.is_permanent]
            records = [record for record in self._records() if record[0] != direction]
            self._records()[:] = records + [(direction, h.hook, h.is_permanent, h.context_level) for h in kept]

    def has_hooks(self, dir: str = "both", including_permanent: bool = True, level: int | None = None) -> bool:
        """Whether this point has hooks of direction `dir` in this thread (TransformerLens's filters:
        `including_permanent=False` ignores permanent ones, `level` counts only that level's)."""
        _flag(including_permanent, "including_permanent")
        return any(
            (including_permanent or not h.is_permanent) and (level is None or h.context_level == level)
            for direction in _directions(dir)
            for h in self._handles(direction)
        )
