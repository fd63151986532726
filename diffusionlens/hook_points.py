"""Hook points: named identity modules whose value a user can read or replace.

`HookPoint` keeps its own list of hook functions instead of torch's forward-hook machinery, for two
reasons: an un-hooked point costs one attribute test (the model has hundreds of them and runs 48
denoising steps per canvas), and the generation context (`hook.ctx.step`, `.canvas`, `.t`) must
reach every hook without threading it through each module's signature.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import pickle
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diffusionlens.hook_context import HookPointContext

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


def _switching_to_torch_call(register: Callable[..., Any]) -> Callable[..., Any]:
    """nn.Module's `register` (one of its hook registrations) for a HookPoint: the point first switches
    to `nn.Module.__call__` (`HookPoint._use_torch_call`), or the hook would never run."""

    @functools.wraps(register)
    def register_and_switch(self: HookPoint, *args: Any, **kwargs: Any) -> Any:
        self._use_torch_call()
        return register(self, *args, **kwargs)

    return register_and_switch


class HookPoint(nn.Module):
    """Identity module marking a named intermediate value."""

    def __init__(self) -> None:
        super().__init__()
        self.name: str = ""
        self.ctx: HookPointContext = HookPointContext(HookContext())
        self.fwd_fns: list[HookFn] = []
        self.bwd_fns: list[HookFn] = []
        # (direction, fn) of hooks added with add_perma_hook: reset_hooks() keeps them unless asked.
        self.permanent_fns: list[tuple[str, HookFn]] = []

    @property
    def active(self) -> bool:
        return bool(self.fwd_fns or self.bwd_fns)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # bypass nn.Module.__call__: hot path
        if not self.fwd_fns and not self.bwd_fns:
            return x
        return self._run_hooks(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Reached through nn.Module.__call__ only once a torch module hook is registered (see below).
        return self._run_hooks(x)

    def _run_hooks(self, x: torch.Tensor) -> torch.Tensor:
        for fn in self.fwd_fns:
            out = fn(x, self)
            if out is not None:
                x = self._checked(out, x)
        if self.bwd_fns and not x.requires_grad and x.is_floating_point() and torch.is_grad_enabled():
            # A loaded model is frozen, so nothing upstream requires grad and the backward hook would
            # never fire. Start the graph here, at the activation: parameters keep requires_grad=False.
            x = x.detach().requires_grad_(True)
        if self.bwd_fns and x.requires_grad:
            # Bind the hooks now: the backward of this forward runs them even if it happens after they
            # were removed (run_with_hooks removes its hooks as soon as the forward returns).
            fns = tuple(self.bwd_fns)
            x.register_hook(lambda grad: self._run_backward(grad, fns))
        return x

    # torch's own module hooks: HookPoint.__call__ skips nn.Module.__call__ (the hot path), so the first
    # registration switches this instance to a subclass that goes through it and so runs them.
    register_forward_hook = _switching_to_torch_call(nn.Module.register_forward_hook)
    register_forward_pre_hook = _switching_to_torch_call(nn.Module.register_forward_pre_hook)
    register_full_backward_hook = _switching_to_torch_call(nn.Module.register_full_backward_hook)
    register_full_backward_pre_hook = _switching_to_torch_call(nn.Module.register_full_backward_pre_hook)
    register_backward_hook = _switching_to_torch_call(nn.Module.register_backward_hook)

    def _use_torch_call(self) -> None:
        if type(self) is HookPoint:
            self.__class__ = TorchHookedHookPoint

    def clear_context(self) -> None:
        """Empty this point's `ctx` dict (TransformerLens' name); step/canvas/t are unaffected."""
        self.ctx.clear()

    def __getstate__(self) -> dict[str, Any]:
        if self.fwd_fns or self.bwd_fns:
            raise pickle.PicklingError(
                f"hook point '{self.name}' has hooks attached, and hook functions (often lambdas or closures) "
                "are not part of a saved model. Call model.reset_hooks(including_permanent=True) before "
                "pickling, or save the weights with model.save_pretrained(directory)."
            )
        return super().__getstate__()

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


class TorchHookedHookPoint(HookPoint):
    """A HookPoint with torch module hooks registered on it: called through nn.Module.__call__ so
    `register_forward_hook` and friends fire (around our own hook functions, which run in forward)."""

    __call__ = nn.Module.__call__


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
                module.ctx = HookPointContext(self.hook_ctx)
                self.hook_dict[name] = module

    # ------------------------------------------------------------------ name resolution
    def resolve_hook_names(self, names: NameFilter) -> list[str]:
        """Hook names matched by `names`: see `diffusionlens.hook_points.resolve_hook_names` (None = all;
        exact, glob, regex, list, predicate; matching nothing raises a KeyError naming the nearest)."""
        return resolve_hook_names(names, self.hook_dict)

    def unknown_hook_message(self, name: str) -> str:
        return unknown_hook_message(name, self.hook_dict)

    # ------------------------------------------------------------------ adding / removing
    def add_hook(
        self,
        name: str | Callable[[str], bool],
        fn: HookFn,
        dir: str = "fwd",
        *,
        prepend: bool = False,
        is_permanent: bool = False,
    ) -> list[HookPoint]:
        """Attach `fn(tensor, hook)` to every matching hook point; returns the points touched.

        prepend: run before the hooks already there (TransformerLens' `prepend`). is_permanent: survive
        `reset_hooks()` and the end of `hooks()`/`run_with_hooks` (as `add_perma_hook`).
        """
        _check_hook_args(fn, dir, prepend)
        points = [self.hook_dict[n] for n in self.resolve_hook_names(name)]
        for point in points:
            fns = point.fwd_fns if dir == "fwd" else point.bwd_fns
            fns.insert(0, fn) if prepend else fns.append(fn)
            if is_permanent:
                point.permanent_fns.append((dir, fn))
        return points

    def add_perma_hook(self, name: str | Callable[[str], bool], fn: HookFn, dir: str = "fwd") -> list[HookPoint]:
        """A hook that `reset_hooks()` keeps; only `reset_hooks(including_permanent=True)` removes it."""
        return self.add_hook(name, fn, dir, is_permanent=True)

    def reset_hooks(
        self, clear_contexts: bool = True, direction: str = "both", including_permanent: bool = False
    ) -> None:
        """Remove hooks from every hook point, as TransformerLens: permanent hooks stay unless
        `including_permanent=True`; each point's `ctx` dict is emptied unless `clear_contexts=False`."""
        if direction not in ("fwd", "bwd", "both"):
            raise ValueError(f"direction must be 'fwd', 'bwd' or 'both', got {direction!r}")
        for point in self.hook_dict.values():
            for dir_name, fns in (("fwd", point.fwd_fns), ("bwd", point.bwd_fns)):
                if direction in (dir_name, "both"):
                    kept = [] if including_permanent else [fn for d, fn in point.permanent_fns if d == dir_name]
                    fns[:] = [fn for fn in fns if _take(kept, fn)]
                    point.permanent_fns[:] = [(d, fn) for d, fn in point.permanent_fns if d != dir_name or fn in fns]
            if clear_contexts:
                point.clear_context()

    @property
    def has_hooks(self) -> bool:
        return any(p.active for p in self.hook_dict.values())

    @contextmanager
    def hooks(
        self,
        fwd_hooks: Iterable[tuple[Any, HookFn]] = (),
        bwd_hooks: Iterable[tuple[Any, HookFn]] = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
    ) -> Iterator[HookedRootModule]:
        """Attach hooks for the duration of a `with` block; they are removed even if the block raises.

        As TransformerLens: `reset_hooks_end=False` leaves them attached afterwards (remove them with
        `reset_hooks()`); `clear_contexts=True` empties every point's `ctx` dict at the end. Backward
        hooks stay bound to the forward pass that ran inside the block, so a `.backward()` after it
        still runs them.
        """
        _check_flag(reset_hooks_end, "reset_hooks_end")
        _check_flag(clear_contexts, "clear_contexts")
        attached: list[tuple[HookPoint, HookFn, str]] = []
        try:
            for direction, pairs in (("fwd", fwd_hooks), ("bwd", bwd_hooks)):
                for name, fn in pairs:
                    for point in self.add_hook(name, fn, direction):
                        attached.append((point, fn, direction))
            yield self
        finally:
            if clear_contexts:
                for point in self.hook_dict.values():
                    point.clear_context()
            for point, fn, direction in reversed(attached if reset_hooks_end else []):
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
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Run `self(*args, **kwargs)` with temporary hooks (removed afterwards, even on error, unless
        `reset_hooks_end=False`; see `hooks`)."""
        with self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts):
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


def _check_hook_args(fn: Any, dir: str, prepend: Any) -> None:
    if dir not in ("fwd", "bwd"):
        raise ValueError(f"dir must be 'fwd' or 'bwd', got {dir!r}")
    if not callable(fn):
        raise TypeError(f"a hook must be a function fn(tensor, hook) -> tensor | None, got {type(fn).__name__}")
    _check_flag(prepend, "prepend")


def _check_flag(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def _take(pool: list[HookFn], fn: HookFn) -> bool:
    """Whether `fn` is (still) in `pool`, consuming one occurrence: a function added once permanently
    and once temporarily keeps exactly one copy through a reset."""
    for i, candidate in enumerate(pool):
        if candidate is fn:
            del pool[i]
            return True
    return False
