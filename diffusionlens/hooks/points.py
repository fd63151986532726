"""Hook points: named identity modules whose value a user can read or replace.

`HookPoint` keeps its own list of hook functions instead of torch's forward-hook machinery, for two
reasons: an un-hooked point costs two attribute tests (the model has hundreds of them and runs 48
denoising steps per canvas), and the generation context (`hook.ctx.step`, `.canvas`, `.t`) must
reach every hook without threading it through each module's signature.

Threads. A point holds two kinds of hooks. Model-level hooks (`add_hook`, `add_perma_hook`, hooks left
by `reset_hooks_end=False`) live in its `fwd_fns` / `bwd_fns` lists and fire in every thread. Run hooks
(`hooks()`, `run_with_hooks`, `generate(fwd_hooks=...)`, patch runs) live in a thread-local table
(`_ThreadHooks`) and fire only in the thread whose run attached them. A point with run hooks from any
thread is switched to `RunHookedHookPoint`, whose call looks up the calling thread's; the others keep
the fast path unchanged. The generation context is per
thread too (`HookContext`, in `hooks/generation_context.py`, keeps its values in a `threading.local`).
Which hook names a names filter picks is `hooks/name_filters.py`.
"""

from __future__ import annotations

import functools
import pickle
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from diffusionlens.hooks.generation_context import HookContext
from diffusionlens.hooks.name_filters import NameFilter, resolve_hook_names, unknown_hook_message
from diffusionlens.hooks.point_context import HookPointContext
from diffusionlens.hooks.point_handles import HookPointHandles

HookFn = Callable[[torch.Tensor, "HookPoint"], torch.Tensor | None]


# Where a run hook sits among a point's hooks: "fwd_first" (added with prepend=True inside a run) runs
# before the model-level forward hooks, "fwd" after them; likewise for backward hooks.
_KINDS = ("fwd_first", "fwd", "bwd_first", "bwd")
Attached = tuple["HookPoint", HookFn, str]


class _ThreadHooks(threading.local):
    """This thread's run hooks, by kind then point, and its open runs (innermost last), each the list of
    (point, fn, kind) it attached, so that `add_hook` called inside a run attaches to that run."""

    def __init__(self) -> None:
        self.fwd_first: dict[HookPoint, list[HookFn]] = {}
        self.fwd: dict[HookPoint, list[HookFn]] = {}
        self.bwd_first: dict[HookPoint, list[HookFn]] = {}
        self.bwd: dict[HookPoint, list[HookFn]] = {}
        self.runs: list[list[Attached]] = []


_THREAD_HOOKS = _ThreadHooks()
# Guards every HookPoint.run_hook_count update (`+=` on an attribute is not atomic across threads) and
# the class switch that goes with it.
_COUNT_LOCK = threading.Lock()


def _attach(point: HookPoint, fn: HookFn, kind: str) -> None:
    table: dict[HookPoint, list[HookFn]] = getattr(_THREAD_HOOKS, kind)
    fns = table.setdefault(point, [])
    fns.insert(0, fn) if kind.endswith("_first") else fns.append(fn)
    _count_run_hooks(point, 1)


def _count_run_hooks(point: HookPoint, change: int) -> None:
    """Add `change` to the point's run-hook count, moving it onto `RunHookedHookPoint` while the count is
    positive and back to the plain class (the fast path) when it drops to 0."""
    with _COUNT_LOCK:
        point.run_hook_count += change
        if point.run_hook_count and type(point) is HookPoint:
            point.__class__ = RunHookedHookPoint
        elif not point.run_hook_count and type(point) is RunHookedHookPoint:
            point.__class__ = HookPoint


def _detach(point: HookPoint, fn: HookFn, kind: str) -> bool:
    """Remove one `fn` (the one `_attach` added: the last appended, the first prepended); False if the
    run's hook is gone already (a `reset_hooks()` inside the run removed it)."""
    table: dict[HookPoint, list[HookFn]] = getattr(_THREAD_HOOKS, kind)
    fns = table.get(point)
    if not fns:
        return False
    order = range(len(fns)) if kind.endswith("_first") else range(len(fns) - 1, -1, -1)
    for i in order:
        if fns[i] is fn:
            del fns[i]
            if not fns:
                del table[point]
            _count_run_hooks(point, -1)
            return True
    return False


def _in_order(first: list[HookFn] | None, model_level: list[HookFn], after: list[HookFn] | None) -> list[HookFn]:
    """A point's hooks for this thread in firing order, copying only when two sources are non-empty."""
    if not first:
        if not after:
            return model_level
        if not model_level:
            return after
    return [*(first or ()), *model_level, *(after or ())]


def _forget_run(runs: list[list[Attached]], attached: list[Attached]) -> None:
    """Close a run: remove its list (by identity; normally the innermost) from this thread's open runs."""
    for i in range(len(runs) - 1, -1, -1):
        if runs[i] is attached:
            del runs[i]
            return


def _detach_all(point: HookPoint, kinds: Iterable[str]) -> None:
    """Drop every run hook of this thread of `kinds` from `point` (`reset_hooks()` inside a run)."""
    for kind in kinds:
        fns = getattr(_THREAD_HOOKS, kind).pop(point, None)
        if fns:
            _count_run_hooks(point, -len(fns))


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


class HookPoint(HookPointHandles, nn.Module):
    """Identity module marking a named intermediate value. TransformerLens's per-point methods
    (`add_hook`, `remove_hooks`, `has_hooks`, `fwd_hooks`, `bwd_hooks`) come from `HookPointHandles`."""

    def __init__(self) -> None:
        super().__init__()
        self.name: str = ""
        self.ctx: HookPointContext = HookPointContext(HookContext())
        self.fwd_fns: list[HookFn] = []
        self.bwd_fns: list[HookFn] = []
        # (direction, fn) of hooks added with add_perma_hook: reset_hooks() keeps them unless asked.
        self.permanent_fns: list[tuple[str, HookFn]] = []
        # Run hooks attached here by all threads together (they live in _THREAD_HOOKS).
        self.run_hook_count = 0

    @property
    def active(self) -> bool:
        """Whether any hook fires here in this thread: model-level ones, or this thread's run hooks."""
        if self.fwd_fns or self.bwd_fns:
            return True
        return bool(self.run_hook_count) and any(self in getattr(_THREAD_HOOKS, kind) for kind in _KINDS)

    def thread_hooks(self, dir: str) -> list[HookFn]:
        """The hooks of direction `dir` ("fwd" or "bwd") that fire here in this thread, in firing order:
        this thread's prepended run hooks, the model-level hooks, then this thread's run hooks."""
        if dir not in ("fwd", "bwd"):
            raise ValueError(f"dir must be 'fwd' or 'bwd', got {dir!r}")
        model_level = self.fwd_fns if dir == "fwd" else self.bwd_fns
        if not self.run_hook_count:
            return list(model_level)
        first = getattr(_THREAD_HOOKS, f"{dir}_first").get(self)
        return list(_in_order(first, model_level, getattr(_THREAD_HOOKS, dir).get(self)))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # bypass nn.Module.__call__: hot path
        if not self.fwd_fns and not self.bwd_fns:
            return x
        return self._run_hooks(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Reached through nn.Module.__call__ only once a torch module hook is registered (see below).
        return self._run_hooks(x)

    def _run_hooks(self, x: torch.Tensor) -> torch.Tensor:
        fwd_fns, bwd_fns = self.fwd_fns, self.bwd_fns
        if self.run_hook_count:
            # Some thread has run hooks here; only this thread's own join the model-level ones.
            local = _THREAD_HOOKS
            fwd_fns = _in_order(local.fwd_first.get(self), fwd_fns, local.fwd.get(self))
            bwd_fns = _in_order(local.bwd_first.get(self), bwd_fns, local.bwd.get(self))
        for fn in fwd_fns:
            out = fn(x, self)
            if out is not None:
                x = self._checked(out, x)
        if bwd_fns and not x.requires_grad and x.is_floating_point() and torch.is_grad_enabled():
            # A loaded model is frozen, so nothing upstream requires grad and the backward hook would
            # never fire. Start the graph here, at the activation: parameters keep requires_grad=False.
            x = x.detach().requires_grad_(True)
        if bwd_fns and x.requires_grad:
            # Bind the hooks now: the backward of this forward runs them even if it happens after they
            # were removed (run_with_hooks removes its hooks as soon as the forward returns).
            fns = tuple(bwd_fns)
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
        with _COUNT_LOCK:
            if type(self) in (HookPoint, RunHookedHookPoint):
                self.__class__ = TorchHookedHookPoint

    def use_module_call(self, enabled: bool) -> None:
        """Call this point through `nn.Module.__call__` (enabled) or the fast path that skips it (the
        default). Tools that wrap a module's `forward` or its torch hooks (nnsight) see the point only
        on the module call. Disabling keeps the module call while torch hooks are registered here, as
        they would otherwise stop firing without a word."""
        _check_flag(enabled, "enabled")
        if enabled:
            self._use_torch_call()
            return
        torch_hooks = (self._forward_hooks, self._forward_pre_hooks, self._backward_hooks, self._backward_pre_hooks)
        with _COUNT_LOCK:
            if type(self) is TorchHookedHookPoint and not any(torch_hooks):
                self.__class__ = RunHookedHookPoint if self.run_hook_count else HookPoint

    def clear_context(self) -> None:
        """Empty this point's `ctx` dict (TransformerLens' name); step/canvas/t are unaffected."""
        self.ctx.clear()

    def __getstate__(self) -> dict[str, Any]:
        if self.active:
            raise pickle.PicklingError(
                f"hook point '{self.name}' has hooks attached, and hook functions (often lambdas or closures) "
                "are not part of a saved model. Call model.reset_hooks(including_permanent=True) before "
                "pickling, or save the weights with model.save_pretrained(directory)."
            )
        # Other threads' run hooks are theirs, not the model's: the copy starts with none.
        return {**super().__getstate__(), "run_hook_count": 0}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A point pickled before run hooks existed has no count; one pickled while another thread ran
        # hooks on it comes back with none, so on the plain class.
        super().__setstate__({**state, "run_hook_count": 0})
        if type(self) is RunHookedHookPoint:
            self.__class__ = HookPoint

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
            if isinstance(out, tuple) and len(out) == 1:
                out = out[0]  # TransformerLens's backward hooks may return (grad,), as torch's module hooks do
            if out is not None:
                grad = self._checked(out, grad)
        return grad

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


class RunHookedHookPoint(HookPoint):
    """A HookPoint on which some thread has run hooks (`run_hook_count` > 0): every call goes to
    `_run_hooks`, which adds the calling thread's run hooks (if any) to the model-level ones. The plain
    class's test of its own two lists would skip them."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._run_hooks(x)


class TorchHookedHookPoint(HookPoint):
    """A HookPoint with torch module hooks registered on it: called through nn.Module.__call__ so
    `register_forward_hook` and friends fire (around our own hook functions, which run in forward)."""

    __call__ = nn.Module.__call__


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
        """Hook names matched by `names`: see `diffusionlens.hooks.name_filters.resolve_hook_names` (None = all;
        exact, glob, regex, list, predicate; matching nothing raises a KeyError naming the nearest)."""
        return resolve_hook_names(names, self.hook_dict)

    def unknown_hook_message(self, name: str) -> str:
        return unknown_hook_message(name, self.hook_dict)

    def switch_needed(self, name: str) -> str | None:
        """The call that makes hook point `name` fire, when it is switched off now (None: it fires).
        A model with opt-in hook points overrides this; hooks on a switched-off point are refused."""
        return None

    def check_hooks_to_add(self, names: Iterable[str]) -> None:
        """Refuse hooks that would never fire (TransformerLens's check of the same name), naming the switch."""
        for name in names:
            switch = self.switch_needed(name)
            if switch is not None:
                raise ValueError(f"a hook on '{name}' would never fire: it is switched off; call {switch} first")

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

        A model-level hook: it fires in every thread that runs the model, until removed. Called inside a
        run in this thread (from a hook, during `run_with_hooks`, `generate` or a patch run) it instead
        joins that run, and is removed when the run ends; `is_permanent=True` always makes it model-level.
        prepend: run before the hooks already there (TransformerLens' `prepend`). is_permanent: survive
        `reset_hooks()` and the end of `hooks()`/`run_with_hooks` (as `add_perma_hook`).
        """
        _check_hook_args(fn, dir, prepend)
        _check_flag(is_permanent, "is_permanent")
        names = self.resolve_hook_names(name)
        self.check_hooks_to_add(names)
        points = [self.hook_dict[n] for n in names]
        runs = _THREAD_HOOKS.runs
        if runs and not is_permanent:
            kind = f"{dir}_first" if prepend else dir
            for point in points:
                _attach(point, fn, kind)
                runs[-1].append((point, fn, kind))
            return points
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
        `including_permanent=True`; each point's `ctx` dict (and any attribute set on it) is emptied unless
        `clear_contexts=False`. Removes the model-level hooks and this thread's run hooks, never the
        run hooks of another thread's run."""
        if direction not in ("fwd", "bwd", "both"):
            raise ValueError(f"direction must be 'fwd', 'bwd' or 'both', got {direction!r}")
        _check_flag(clear_contexts, "clear_contexts")
        _check_flag(including_permanent, "including_permanent")
        run_kinds = [kind for kind in _KINDS if direction in ("both", kind.split("_")[0])]
        for point in self.hook_dict.values():
            for dir_name, fns in (("fwd", point.fwd_fns), ("bwd", point.bwd_fns)):
                if direction in (dir_name, "both"):
                    kept = [] if including_permanent else [fn for d, fn in point.permanent_fns if d == dir_name]
                    fns[:] = [fn for fn in fns if _take(kept, fn)]
                    point.permanent_fns[:] = [(d, fn) for d, fn in point.permanent_fns if d != dir_name or fn in fns]
            point.forget_removed_records()
            if point.run_hook_count:
                _detach_all(point, run_kinds)
            if clear_contexts:
                point.clear_context()

    def set_module_call_hook_points(self, enabled: bool) -> None:
        """Route every hook point through `nn.Module.__call__` (True) or back to the fast path (False, the
        default). nnsight wraps a module's `forward`, which the fast path never calls: turn this on before
        `NNsight(model)` traces hook points (docs/coming_from_transformerlens.md). It costs a module call
        per point per pass; our own hooks fire the same either way."""
        _check_flag(enabled, "enabled")
        for point in self.hook_dict.values():
            point.use_module_call(enabled)

    def remove_all_hook_fns(
        self, direction: str = "both", including_permanent: bool = False, level: int | None = None
    ) -> None:
        """TransformerLens's name: remove hooks as `reset_hooks` does, leaving every `ctx` as it is; with
        `level`, only the hooks added at that level (`HookPoint.add_hook(..., level=)`)."""
        if level is None:
            self.reset_hooks(clear_contexts=False, direction=direction, including_permanent=including_permanent)
            return
        for point in self.hook_dict.values():
            point.remove_hooks(direction, including_permanent=including_permanent, level=level)

    @property
    def has_hooks(self) -> bool:
        """Whether any hook fires in this thread: a model-level hook, or a run hook of this thread."""
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

        The hooks are run hooks: they fire only in this thread, so another thread running the same
        model meanwhile does not see them. As TransformerLens: `reset_hooks_end=False` leaves them
        attached afterwards, as model-level hooks (remove them with `reset_hooks()`);
        `clear_contexts=True` empties every point's `ctx` dict at the end. Backward hooks stay bound to
        the forward pass that ran inside the block, so a `.backward()` after it still runs them.
        """
        with self._run_hooks_scope(fwd_hooks, bwd_hooks, reset_hooks_end, clear_contexts, is_run=False, check=True):
            yield self

    @contextmanager
    def hooks_for_run(
        self,
        fwd_hooks: Iterable[tuple[Any, HookFn]] = (),
        bwd_hooks: Iterable[tuple[Any, HookFn]] = (),
    ) -> Iterator[HookedRootModule]:
        """`hooks()` for a run (what `run_with_hooks`, `generate` and the patch runs use): besides the
        hooks given, any hook `add_hook` attaches in this thread during the block (from inside a hook)
        belongs to the run and is removed at its end."""
        with self._run_hooks_scope(fwd_hooks, bwd_hooks, True, False, is_run=True):
            yield self

    @contextmanager
    def _run_hooks_scope(
        self,
        fwd_hooks: Iterable[tuple[Any, HookFn]],
        bwd_hooks: Iterable[tuple[Any, HookFn]],
        reset_hooks_end: bool,
        clear_contexts: bool,
        *,
        is_run: bool,
        check: bool = False,
    ) -> Iterator[None]:
        _check_flag(reset_hooks_end, "reset_hooks_end")
        _check_flag(clear_contexts, "clear_contexts")
        # Every name and function is checked before the first hook is attached.
        wanted: list[Attached] = []
        for direction, pairs in (("fwd", fwd_hooks), ("bwd", bwd_hooks)):
            for name, fn in pairs:
                _check_hook_args(fn, direction, False)
                names = self.resolve_hook_names(name)
                if check:
                    self.check_hooks_to_add(names)
                wanted.extend((self.hook_dict[n], fn, direction) for n in names)
        attached: list[Attached] = []
        runs = _THREAD_HOOKS.runs
        if is_run:
            runs.append(attached)
        try:
            for entry in wanted:
                # Listed first: an interrupt between the two still detaches it (a missing one is skipped).
                attached.append(entry)
                _attach(*entry)
            yield
        finally:
            if is_run:
                _forget_run(runs, attached)
            if clear_contexts:
                for point in self.hook_dict.values():
                    point.clear_context()
            still_attached = [entry for entry in reversed(attached) if _detach(*entry)]
            if not reset_hooks_end:
                for point, fn, kind in reversed(still_attached):
                    fns = point.fwd_fns if kind.startswith("fwd") else point.bwd_fns
                    fns.insert(0, fn) if kind.endswith("_first") else fns.append(fn)

    def run_with_hooks(
        self,
        *args: Any,
        fwd_hooks: Iterable[tuple[Any, HookFn]] = (),
        bwd_hooks: Iterable[tuple[Any, HookFn]] = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Run `self(*args, **kwargs)` with temporary hooks: they fire in this run only (not in other
        threads), and are removed afterwards with any hook added during the run, even on error, unless
        `reset_hooks_end=False` (see `hooks`)."""
        with self._run_hooks_scope(fwd_hooks, bwd_hooks, reset_hooks_end, clear_contexts, is_run=True, check=True):
            return self(*args, **kwargs)

    def caching_hooks(
        self,
        store: dict[str, torch.Tensor],
        names_filter: NameFilter = None,
        device: torch.device | str | None = None,
        detach: bool = True,
    ) -> list[tuple[str, HookFn]]:
        """Forward hooks that copy each value `names_filter` picks (see `resolve_hook_names`) into `store[name]`.
        Switched-off points (`switch_needed`) are left out; a filter that picks only such points is refused."""

        def save(tensor: torch.Tensor, hook: HookPoint) -> None:
            value = tensor.detach() if detach else tensor
            store[hook.name] = value.to(device) if device is not None else value

        names = self.resolve_hook_names(names_filter)
        firing = [name for name in names if self.switch_needed(name) is None]
        if names_filter is not None and not firing:
            self.check_hooks_to_add(names)  # asked only for switched-off points: say which switch
        return [(name, save) for name in firing]


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
