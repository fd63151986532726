"""Hook points: named identity modules whose value a user can read or replace.

`HookPoint` keeps its own list of hook functions instead of torch's forward-hook machinery, for two
reasons: an un-hooked point costs one attribute test (the model has hundreds of them and runs 48
denoising steps per canvas), and the generation context (`hook.ctx.step`, `.canvas`, `.t`) must
reach every hook without threading it through each module's signature.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

HookFn = Callable[[torch.Tensor, "HookPoint"], torch.Tensor | None]
NameFilter = str | Callable[[str], bool] | Sequence[str] | None


@dataclass
class HookContext:
    """Where in a generation a forward pass runs; one instance is shared by all hook points.

    step: 0-based denoising step in execution order (None outside denoising, e.g. in the encoder).
    canvas: index of the canvas in a multi-canvas generation (0 for a single forward pass).
    t: the reference implementation's `cur_step`, counting down from `max_denoising_steps` to 1.
    """

    step: int | None = None
    canvas: int = 0
    t: int | None = None

    def reset(self) -> None:
        self.step, self.canvas, self.t = None, 0, None


class HookError(RuntimeError):
    """A hook function misbehaved (wrong shape or dtype, or it raised)."""


class HookPoint(nn.Module):
    """Identity module marking a named intermediate value."""

    def __init__(self) -> None:
        super().__init__()
        self.name: str = ""
        self.ctx: HookContext = HookContext()
        self.fwd_fns: list[HookFn] = []
        self.bwd_fns: list[HookFn] = []

    @property
    def active(self) -> bool:
        return bool(self.fwd_fns or self.bwd_fns)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # bypass nn.Module.__call__: hot path
        if not self.fwd_fns and not self.bwd_fns:
            return x
        for fn in self.fwd_fns:
            out = fn(x, self)
            if out is not None:
                x = self._checked(out, x)
        if self.bwd_fns and x.requires_grad:
            # Bind the hooks now: the backward of this forward runs them even if it happens after they
            # were removed (run_with_hooks removes its hooks as soon as the forward returns).
            fns = tuple(self.bwd_fns)
            x.register_hook(lambda grad: self._run_backward(grad, fns))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)

    def _checked(self, out: Any, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(out, torch.Tensor):
            raise HookError(f"hook on '{self.name}' returned {type(out).__name__}; return a tensor or None")
        if out.shape != x.shape:
            raise HookError(
                f"hook on '{self.name}' returned shape {tuple(out.shape)} but the value has shape "
                f"{tuple(x.shape)}; return a tensor of the same shape (or None to keep the value)"
            )
        if out.dtype != x.dtype:
            raise HookError(
                f"hook on '{self.name}' returned dtype {out.dtype} but the value is {x.dtype}; "
                f"cast it with .to({x.dtype})"
            )
        return out

    def _run_backward(self, grad: torch.Tensor, fns: Sequence[HookFn]) -> torch.Tensor:
        for fn in fns:
            out = fn(grad, self)
            if out is not None:
                grad = self._checked(out, grad)
        return grad

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


def resolve_hook_names(names_filter: NameFilter, available: Iterable[str]) -> list[str]:
    """The names in `available` that `names_filter` picks, in `available`'s order for a glob or
    predicate: None (every name), an exact name, a glob (`decoder.blocks.*.hook_resid_post`), a
    regex (`decoder\\.blocks\\.(0|1)\\..*`), a list of those, or a predicate `fn(name) -> bool`.

    The one resolver behind every names filter (hooks, caches, patches, the CLI): a name or pattern
    that matches nothing, or a predicate that matches nothing, raises a KeyError naming the nearest
    hook names, because a typo that silently matches nothing would record or patch nothing.
    """
    available = list(available)
    if names_filter is None:
        return available
    if callable(names_filter):
        matched = [n for n in available if names_filter(n)]
        if not matched:
            raise KeyError(
                f"the names_filter predicate {getattr(names_filter, '__name__', names_filter)!r} matched no hook "
                "point; list them with sorted(model.hook_dict)"
            )
        return matched
    if isinstance(names_filter, str):
        patterns = [names_filter]
    elif isinstance(names_filter, Iterable):
        patterns = list(names_filter)
    else:
        raise TypeError(
            f"names_filter must be a hook name, glob, regex, list of those or a predicate, got {names_filter!r}"
        )
    out: list[str] = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"names_filter entries must be strings (names, globs or regexes), got {pattern!r}")
        matched = _matches(pattern, available)
        if not matched:
            raise KeyError(unknown_hook_message(pattern, available))
        out.extend(m for m in matched if m not in out)
    return out


def _matches(pattern: str, available: list[str]) -> list[str]:
    if pattern in available:
        return [pattern]
    matched = [n for n in available if fnmatch.fnmatchcase(n, pattern)]
    if not matched and re.search(r"[\^$+()|\\]", pattern):
        regex = re.compile(pattern)
        matched = [n for n in available if regex.fullmatch(n)]
    return matched


def unknown_hook_message(name: str, available: Iterable[str]) -> str:
    nearest = difflib.get_close_matches(name, list(available), n=5, cutoff=0.5)
    hint = f" Nearest names: {', '.join(nearest)}." if nearest else ""
    return (
        f"Unknown hook point '{name}'.{hint} "
        "List them all with sorted(model.hook_dict) or use a glob such as 'decoder.blocks.*.hook_resid_post'."
    )


class HookedRootModule(nn.Module):
    """Base class giving a model TransformerLens' hook API over its `HookPoint`s.

    Call `setup()` once all submodules exist: it names every hook point and shares one context.
    """

    def setup(self) -> None:
        self.hook_ctx = HookContext()
        self.hook_dict: dict[str, HookPoint] = {}
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name
                module.ctx = self.hook_ctx
                self.hook_dict[name] = module

    # ------------------------------------------------------------------ name resolution
    def resolve_hook_names(self, names: NameFilter) -> list[str]:
        """Hook names matched by `names`: see `diffusionlens.hook_points.resolve_hook_names` (None = all;
        exact, glob, regex, list, predicate; matching nothing raises a KeyError naming the nearest)."""
        return resolve_hook_names(names, self.hook_dict)

    def unknown_hook_message(self, name: str) -> str:
        return unknown_hook_message(name, self.hook_dict)

    # ------------------------------------------------------------------ adding / removing
    def add_hook(self, name: str | Callable[[str], bool], fn: HookFn, dir: str = "fwd") -> list[HookPoint]:
        """Attach `fn(tensor, hook)` to every matching hook point; returns the points touched."""
        if dir not in ("fwd", "bwd"):
            raise ValueError(f"dir must be 'fwd' or 'bwd', got {dir!r}")
        points = [self.hook_dict[n] for n in self.resolve_hook_names(name)]
        for point in points:
            (point.fwd_fns if dir == "fwd" else point.bwd_fns).append(fn)
        return points

    def reset_hooks(self) -> None:
        """Remove every hook from every hook point."""
        for point in self.hook_dict.values():
            point.fwd_fns.clear()
            point.bwd_fns.clear()

    @property
    def has_hooks(self) -> bool:
        return any(p.active for p in self.hook_dict.values())

    @contextmanager
    def hooks(
        self,
        fwd_hooks: Iterable[tuple[Any, HookFn]] = (),
        bwd_hooks: Iterable[tuple[Any, HookFn]] = (),
    ) -> Iterator[HookedRootModule]:
        """Attach hooks for the duration of a `with` block; they are removed even if the block raises."""
        attached: list[tuple[HookPoint, HookFn, str]] = []
        try:
            for direction, pairs in (("fwd", fwd_hooks), ("bwd", bwd_hooks)):
                for name, fn in pairs:
                    for point in self.add_hook(name, fn, direction):
                        attached.append((point, fn, direction))
            yield self
        finally:
            for point, fn, direction in reversed(attached):
                fns = point.fwd_fns if direction == "fwd" else point.bwd_fns
                for i in range(len(fns) - 1, -1, -1):
                    if fns[i] is fn:
                        del fns[i]
                        break

    def run_with_hooks(
        self,
        *args: Any,
        fwd_hooks: Iterable[tuple[Any, HookFn]] = (),
        bwd_hooks: Iterable[tuple[Any, HookFn]] = (),
        **kwargs: Any,
    ) -> Any:
        """Run `self(*args, **kwargs)` with temporary hooks (removed afterwards, even on error)."""
        with self.hooks(fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks):
            return self(*args, **kwargs)

    def caching_hooks(
        self,
        store: dict[str, torch.Tensor],
        names_filter: NameFilter = None,
        device: torch.device | str | None = None,
        detach: bool = True,
    ) -> list[tuple[str, HookFn]]:
        """Forward hooks that copy each value `names_filter` picks (see `resolve_hook_names`) into `store[name]`."""

        def save(tensor: torch.Tensor, hook: HookPoint) -> None:
            value = tensor.detach() if detach else tensor
            store[hook.name] = value.to(device) if device is not None else value

        return [(name, save) for name in self.resolve_hook_names(names_filter)]
