"""Tracing PyTorch callables to ATen graphs on the meta device.

``make_fx`` in ``"real"`` mode on meta tensors records every ATen op with its shapes while allocating no
storage, so a 26B-parameter model traces in seconds in a few MB. ``functionalize`` rewrites in-place ops
(``x *= s``) into out-of-place ones, so graph edges are true data dependencies; without it a later reader of a
mutated tensor would point at the pre-mutation node and the mutation's depth would be lost.

Module attribution: ``make_fx``'s ``record_module_stack`` does not fire for ordinary eager modules here, so
global forward hooks keep a stack of module names and label, on each module entry and exit, the nodes the
tracer created since the previous event with the innermost active module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.experimental.proxy_tensor import get_proxy_mode, make_fx
from torch.utils import _pytree as pytree

__all__ = ["TracedGraph", "trace", "to_meta"]

MODULE_META_KEY = "serial_depth_module"


def to_meta(x: Any) -> Any:
    """Maps every tensor in a pytree to a meta tensor of the same shape and dtype (no storage)."""

    def conv(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and not t.is_meta:
            return torch.empty_like(t, device="meta")
        return t

    return pytree.tree_map(conv, x)


@dataclass
class TracedGraph:
    """An ATen graph plus the bookkeeping the depth pass needs.

    Attributes:
        graph_module: the ``make_fx`` output.
        placeholders: placeholder nodes in call order: flattened user inputs first, then module state.
        input_owner: for each user placeholder, the positional index (int) or keyword name (str) it came from.
    """

    graph_module: GraphModule
    placeholders: list[Node]
    input_owner: list[int | str] = field(default_factory=list)


class _ModuleLabeler:
    """Labels traced nodes with the innermost module active while they were recorded."""

    def __init__(self, names: dict[int, str]):
        self.names = names
        self.stack: list[str] = []
        self.last: Node | None = None
        self.handles: list[Any] = []

    def _flush(self) -> None:
        mode = get_proxy_mode()
        if mode is None:
            return
        graph = mode.tracer.graph
        label = self.stack[-1] if self.stack else ""
        node = self.last.next if self.last is not None else next(iter(graph.nodes), None)
        root = graph._root
        while node is not None and node is not root:
            node.meta.setdefault(MODULE_META_KEY, label)
            self.last = node
            node = node.next

    def _pre(self, module: nn.Module, args: Any) -> None:
        self._flush()
        self.stack.append(self.names.get(id(module), type(module).__name__))

    def _post(self, module: nn.Module, args: Any, out: Any) -> None:
        self._flush()
        if self.stack:
            self.stack.pop()

    def __enter__(self) -> _ModuleLabeler:
        self.handles = [
            nn.modules.module.register_module_forward_pre_hook(self._pre),
            nn.modules.module.register_module_forward_hook(self._post),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()


def _owners(args: tuple, kwargs: dict) -> tuple[list[Any], list[int | str], Callable[[list[Any]], Any]]:
    """Flattens (args, kwargs), remembering which argument each tensor leaf belongs to."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    owners: list[int | str] = []
    for i, a in enumerate(args):
        owners += [i] * len(pytree.tree_leaves(a))
    for k, v in kwargs.items():
        owners += [k] * len(pytree.tree_leaves(v))
    return leaves, owners, lambda new: pytree.tree_unflatten(new, spec)


def trace(fn: Callable[..., Any] | nn.Module, *args: Any, **kwargs: Any) -> TracedGraph:
    """Traces ``fn(*args, **kwargs)`` to a functional ATen graph on meta tensors.

    Real tensors (inputs, parameters, buffers) are replaced by meta tensors of the same shape and dtype, so
    tracing costs no memory for weights. Non-tensor arguments are baked into the graph as constants.
    """
    leaves, owners, unflatten = _owners(args, kwargs)
    tensor_pos = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    user_tensors = [to_meta(leaves[i]) for i in tensor_pos]
    user_owner = [owners[i] for i in tensor_pos]

    names: dict[int, str] = {}
    state: dict[str, torch.Tensor] = {}
    if isinstance(fn, nn.Module):
        names = {id(m): (name or type(fn).__name__) for name, m in fn.named_modules()}
        # One placeholder per distinct tensor: tied weights (the encoder and decoder share theirs) are passed once
        # under their first name, and functional_call's tie_weights gives the value to every tied name.
        state = {k: to_meta(v) for k, v in fn.named_parameters()}
        state.update({k: to_meta(v) for k, v in fn.named_buffers()})
    state_keys = list(state)

    def flat_fn(*flat: torch.Tensor) -> Any:
        new_leaves = list(leaves)
        for pos, t in zip(tensor_pos, flat[: len(tensor_pos)], strict=True):
            new_leaves[pos] = t
        call_args, call_kwargs = unflatten(new_leaves)
        if isinstance(fn, nn.Module):
            new_state = dict(zip(state_keys, flat[len(tensor_pos) :], strict=True))
            return torch.func.functional_call(fn, new_state, tuple(call_args), call_kwargs)
        return fn(*call_args, **call_kwargs)

    with _ModuleLabeler(names) as labeler, torch.no_grad():
        gm = make_fx(torch.func.functionalize(flat_fn), tracing_mode="real")(*user_tensors, *state.values())
        labeler._flush()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return TracedGraph(gm, placeholders, user_owner)


def source_placeholders(traced: TracedGraph, sources: Iterable[int | str]) -> set[Node]:
    """Placeholder nodes of the user arguments named in ``sources`` (positional index or keyword name)."""
    wanted = set(sources)
    return {p for p, owner in zip(traced.placeholders, traced.input_owner, strict=False) if owner in wanted}
