"""Longest-path serial depth over a traced ATen graph.

FX graphs are in topological order, so one forward sweep computes, for every node, the depth of the longest
chain of charged ops ending at it: ``depth(node) = max(depth(inputs)) + cost(node)``. Sources (placeholders,
parameters, constants) start at 0. The result is the largest depth reaching an output or an interpretable
boundary (a chain that ends in a boundary is opaque up to it; the boundary's output restarts at 0).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.fx import Node
from torch.utils import _pytree as pytree

from .boundary import BOUNDARY_OP_NAME
from .rules import RULES, Rule, lookup_rule, op_name
from .trace import MODULE_META_KEY, TracedGraph, source_placeholders, trace

__all__ = ["SerialDepthResult", "PathStep", "OpStats", "serial_depth", "graph_depth"]

_NEG = -math.inf
_WARNED: set[str] = set()


@dataclass(frozen=True)
class PathStep:
    """One charged op on the critical path."""

    node: str
    op: str
    cost: int
    depth: int
    module: str
    shape: tuple[int, ...]


@dataclass
class OpStats:
    """Per-op counts and total charged depth."""

    count: int = 0
    depth: int = 0


@dataclass
class SerialDepthResult:
    """Outcome of a serial-depth computation.

    Attributes:
        depth: length of the longest opaque chain (an int).
        critical_path: the charged ops (cost > 0) of one longest chain, in execution order.
        per_op: op name -> stats over the critical path.
        per_op_all: op name -> stats over every node in the graph (count, and sum of costs).
        per_module: innermost module name -> depth charged on the critical path ("" outside modules).
        unknown_ops: ops with no rule (charged 0, like the JAX reference does with unsupported primitives).
        num_nodes: number of ATen call nodes.
        output_depths: depth of each flattened output leaf of ``fn`` (None where no chain from a source
            reaches it, e.g. with ``sources`` restricted).
    """

    depth: int
    critical_path: list[PathStep] = field(default_factory=list)
    per_op: dict[str, OpStats] = field(default_factory=dict)
    per_op_all: dict[str, OpStats] = field(default_factory=dict)
    per_module: dict[str, int] = field(default_factory=dict)
    unknown_ops: set[str] = field(default_factory=set)
    num_nodes: int = 0
    output_depths: list[int | None] = field(default_factory=list)

    def summary(self, top: int = 10) -> str:
        """A short human-readable summary."""
        lines = [f"serial depth {self.depth} ({self.num_nodes} ATen ops)"]
        ranked = sorted(self.per_op.items(), key=lambda kv: -kv[1].depth)[:top]
        lines += [f"  {name:<40} x{s.count:<5} depth {s.depth}" for name, s in ranked]
        if self.unknown_ops:
            lines.append(f"  unknown ops (charged 0): {sorted(self.unknown_ops)}")
        return "\n".join(lines)


def _input_nodes(node: Node, rule: Rule | None) -> list[Node]:
    args = rule.inputs(node) if rule is not None and rule.inputs is not None else (node.args, node.kwargs)
    return [a for a in pytree.tree_leaves(args) if isinstance(a, Node)]


def graph_depth(
    traced: TracedGraph,
    rules: dict[str, Rule] | None = None,
    sources: Iterable[int | str] | None = None,
) -> SerialDepthResult:
    """Longest path over a traced graph.

    Args:
        traced: output of :func:`~diffusionlens.serial_depth.trace.trace`.
        rules: rule table (defaults to :data:`~diffusionlens.serial_depth.rules.RULES`).
        sources: if given, only chains starting at these user arguments (positional index or keyword name)
            count; parameters, constants and other inputs start at minus infinity. This measures e.g. the depth
            from the self-conditioning logits alone, which is what composes across denoising steps.
    """
    table = RULES if rules is None else rules
    src = None if sources is None else source_placeholders(traced, sources)
    base = 0.0 if src is None else _NEG
    depth: dict[Node, float] = {}
    pred: dict[Node, Node | None] = {}
    cost_of: dict[Node, int] = {}
    ends: list[tuple[float, Node]] = []  # chains that end at a boundary or an output
    unknown: set[str] = set()
    per_op_all: dict[str, OpStats] = {}
    out_depths: list[int | None] = []

    for node in traced.graph_module.graph.nodes:
        if node.op == "placeholder":
            depth[node] = 0.0 if (src is None or node in src) else _NEG
            pred[node] = None
            continue
        if node.op == "get_attr":
            depth[node], pred[node] = base, None
            continue
        if node.op == "output":
            for a in pytree.tree_leaves(node.args):
                d = depth[a] if isinstance(a, Node) else _NEG
                out_depths.append(None if d == _NEG else int(d))
                if isinstance(a, Node):
                    ends.append((d, a))
            continue
        name = op_name(node)
        rule = lookup_rule(name, table)
        inputs = _input_nodes(node, rule)
        best = max(inputs, key=lambda a: depth[a], default=None)
        in_depth = depth[best] if best is not None else base
        stats = per_op_all.setdefault(name, OpStats())
        stats.count += 1
        if name == BOUNDARY_OP_NAME:
            if best is not None:
                ends.append((in_depth, best))
            depth[node], pred[node], cost_of[node] = 0.0 if src is None else _NEG, None, 0
            continue
        if rule is None:
            unknown.add(name)
            if name not in _WARNED:
                _WARNED.add(name)
                warnings.warn(f"serial_depth: no rule for {name}; charged 0", stacklevel=2)
            cost = 0
        else:
            cost = int(rule.cost(node))
        stats.depth += cost
        cost_of[node] = cost
        if rule is not None and rule.kind == "constant":
            depth[node], pred[node] = base + cost, None
        else:
            depth[node], pred[node] = in_depth + cost, best

    best_depth, end = max(ends, key=lambda t: t[0], default=(0.0, None))
    if best_depth == _NEG:
        best_depth, end = 0.0, None
    result = _result(int(best_depth), end, pred, cost_of, depth, unknown, per_op_all)
    result.output_depths = out_depths
    return result


def _result(
    total: int,
    end: Node | None,
    pred: dict[Node, Node | None],
    cost_of: dict[Node, int],
    depth: dict[Node, float],
    unknown: set[str],
    per_op_all: dict[str, OpStats],
) -> SerialDepthResult:
    path: list[PathStep] = []
    node = end
    while node is not None:
        cost = cost_of.get(node, 0)
        if cost > 0:
            val = node.meta.get("val")
            shape = tuple(int(s) for s in val.shape) if hasattr(val, "shape") else ()
            module = node.meta.get(MODULE_META_KEY, "")
            path.append(PathStep(node.name, op_name(node), cost, int(depth[node]), module, shape))
        node = pred.get(node)
    path.reverse()
    per_op: dict[str, OpStats] = {}
    per_module: dict[str, int] = {}
    for step in path:
        s = per_op.setdefault(step.op, OpStats())
        s.count += 1
        s.depth += step.cost
        per_module[step.module] = per_module.get(step.module, 0) + step.cost
    n_nodes = sum(s.count for s in per_op_all.values())
    return SerialDepthResult(total, path, per_op, per_op_all, per_module, unknown, n_nodes)


def serial_depth(
    fn: Callable[..., Any] | nn.Module,
    *example_args: Any,
    rules: dict[str, Rule] | None = None,
    sources: Iterable[int | str] | None = None,
    **example_kwargs: Any,
) -> SerialDepthResult:
    """Opaque serial depth of ``fn(*example_args, **example_kwargs)``.

    ``fn`` may be any callable or ``nn.Module``; tensors (inputs, parameters, buffers) may be real or meta and
    are traced as meta tensors, so only shapes matter and no weights are materialised. Computations whose
    control flow depends on tensor values (``.item()``, data-dependent loops) cannot be traced on meta tensors.

    Args:
        fn: the computation.
        example_args: positional example inputs.
        rules: optional rule table replacing :data:`~diffusionlens.serial_depth.rules.RULES`.
        sources: optional positional indices / keyword names of the inputs chains may start from.
        example_kwargs: keyword example inputs.

    Returns:
        A :class:`SerialDepthResult`; ``.depth`` is the int depth.
    """
    traced = trace(fn, *example_args, **example_kwargs)
    return graph_depth(traced, rules=rules, sources=sources)
