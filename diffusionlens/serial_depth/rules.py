"""Depth rules: how many serial steps each ATen op adds to the longest chain.

The rules follow Google DeepMind's JAX ``serial_depth`` calculator (which charges jaxpr primitives) and
translate them to the ATen ops that ``make_fx`` records:

* data movement (views, slicing, concatenation, broadcasting, gathers by index, scatters, dtype casts) adds 0;
* elementwise ops add 1;
* a contraction over ``K`` elements (``mm``/``bmm``/...) adds ``ceil(log2 K) + 1`` (one multiply, then a
  balanced adder tree);
* a reduction over ``N`` elements adds ``ceil(log2 N)``;
* scans, ``topk`` and ``sort`` over ``n`` elements add ``ceil(log2 n)``;
* a select among ``c`` choices adds ``ceil(log2 c)``.

ATen has fused ops that JAX expresses as several primitives (``_softmax``, ``native_layer_norm``, ``gelu``,
``addmm``, ``mean``...). Those are charged as the chain of primitives the JAX reference would see for the same
computation, so that a torch trace and a jaxpr of the same model give the same depth. Each such rule says, in
its ``note``, which decomposition it charges.

Deliberate deviation: the JAX reference charges ``convert_element_type`` 1; here a dtype cast is data movement
(0) because it re-encodes a value rather than computing a new one. ``REFERENCE_COMPAT_OVERRIDES`` restores the
reference's choice when exact agreement with a JAX trace of a bf16 model is wanted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.fx import Node

__all__ = [
    "Rule",
    "RULES",
    "REFERENCE_COMPAT_OVERRIDES",
    "clog2",
    "op_name",
    "lookup_rule",
]


def clog2(n: int) -> int:
    """``ceil(log2 n)`` for ``n >= 1`` (0 for ``n <= 1``): the depth of a balanced tree over ``n`` leaves."""
    n = int(n)
    return 0 if n <= 1 else (n - 1).bit_length()


@dataclass(frozen=True)
class Rule:
    """How one ATen op contributes to serial depth.

    Attributes:
        kind: ``"data"``, ``"elementwise"``, ``"contraction"``, ``"reduction"``, ``"scan"``, ``"select"``,
            ``"composite"``, ``"constant"`` (output depends on no input value: factories, ``zeros_like``) or
            ``"boundary"`` (an interpretable state: the chain resets to 0 after it).
        cost: maps the FX node to the depth the op adds on top of its deepest input.
        note: the decomposition or reasoning behind the cost (rendered in the docs).
        inputs: optionally picks which argument nodes the output really depends on (``copy(dst, src)`` depends
            only on ``src``); by default every tensor argument counts.
    """

    kind: str
    cost: Callable[[Node], int]
    note: str = ""
    inputs: Callable[[Node], Sequence[object]] | None = None


# ---------------------------------------------------------------------------------------------- shape helpers


def _val(arg: object) -> object:
    return arg.meta.get("val") if isinstance(arg, Node) else arg


def _shape(arg: object) -> tuple[int, ...]:
    v = _val(arg)
    if isinstance(v, torch.Tensor):
        return tuple(int(s) for s in v.shape)
    return ()


def _arg(node: Node, i: int, name: str, default: object = None) -> object:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _dims(shape: tuple[int, ...], dim: object) -> list[int]:
    """Normalises a ``dim`` argument (None, int or list; empty list means all dims) to indices."""
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return list(range(len(shape)))
    if isinstance(dim, int):
        dim = [dim]
    return [d % max(len(shape), 1) for d in dim]


def _reduced(node: Node, dim_pos: int = 1, dim_name: str = "dim") -> int:
    """Number of elements each output of a reduction combines."""
    shape = _shape(node.args[0])
    if not shape:
        return 1
    return math.prod(shape[d] for d in _dims(shape, _arg(node, dim_pos, dim_name)))


def _last_or_dim(node: Node, dim_pos: int, default: int = -1) -> int:
    shape = _shape(node.args[0])
    if not shape:
        return 1
    dim = _arg(node, dim_pos, "dim", default)
    return shape[int(dim) % len(shape)]


# -------------------------------------------------------------------------------------------- rule factories


def _const(c: int) -> Callable[[Node], int]:
    return lambda node: c


def _contraction_k(node: Node, lhs: int = 0) -> int:
    return _shape(node.args[lhs])[-1]


def _matmul(lhs: int, extra: int = 0) -> Callable[[Node], int]:
    # One multiply per product, then an adder tree over K; ``extra`` adds e.g. the bias add of addmm.
    return lambda node: clog2(_contraction_k(node, lhs)) + 1 + extra


def _two_reductions(extra: int) -> Callable[[Node], int]:
    # Two reductions over the same N elements (max then sum; mean then sum of squares) and ``extra`` more steps.
    return lambda node: 2 * clog2(_reduced(node)) + extra


def _softmax_cost(n: int) -> int:
    # jax.nn.softmax: reduce_max, sub, exp, reduce_sum, div.
    return 2 * clog2(n) + 3


def _log_softmax_cost(n: int) -> int:
    # jax.nn.log_softmax: reduce_max, sub, exp, reduce_sum, log, sub.
    return 2 * clog2(n) + 4


def _layer_norm(node: Node) -> int:
    n = math.prod(_arg(node, 1, "normalized_shape"))
    # mean (sum + div), sub, square, mean (sum + div), add eps, rsqrt, mul; then scale mul and bias add.
    cost = 2 * (clog2(n) + 1) + 5
    cost += int(_arg(node, 2, "weight") is not None) + int(_arg(node, 3, "bias") is not None)
    return cost


def _rms_norm(node: Node) -> int:
    n = math.prod(_arg(node, 1, "normalized_shape"))
    # square, mean (sum + div), add eps, rsqrt, mul; then the scale mul.
    return clog2(n) + 5 + int(_arg(node, 2, "weight") is not None)


def _sdpa(node: Node) -> int:
    q, k = _shape(node.args[0]), _shape(node.args[1])
    mask = _arg(node, 3, "attn_mask")
    # q@k^T over head_dim, scale, optional mask add, softmax over keys, probs@v over keys.
    return clog2(q[-1]) + 1 + 1 + int(mask is not None) + _softmax_cost(k[-2]) + clog2(k[-2]) + 1


def _gelu(node: Node) -> int:
    # tanh form as jax.nn.gelu(approximate=True): x**3, *c, +x, *sqrt(2/pi), tanh, +1, *0.5, *x = 8.
    # erf form: /sqrt2, erf, +1, *x, /2 = 5.
    return 8 if node.kwargs.get("approximate", _arg(node, 1, "approximate", "none")) == "tanh" else 5


def _to_copy(node: Node) -> int:
    return 0


def _clamp(node: Node) -> int:
    # jnp.clip is max then min: one elementwise op per bound given.
    bounds = [_arg(node, 1, "min"), _arg(node, 2, "max")]
    return max(1, sum(b is not None for b in bounds))


def _max_min(node: Node) -> int:
    # aten.max/min overloads: ``other`` is elementwise, ``default``/``dim`` reduce.
    name = node.target._overloadname if hasattr(node.target, "_overloadname") else ""
    if name in ("other", "binary_out"):
        return 1
    if name in ("default", ""):
        return clog2(math.prod(_shape(node.args[0])) or 1)
    return clog2(_last_or_dim(node, 1))


def _where(node: Node) -> int:
    # select_n over 2 choices: ceil(log2 2) = 1. Single-argument ``where`` is ``nonzero`` (data movement).
    return 1 if len(node.args) >= 3 else 0


def _multinomial(node: Node) -> int:
    # Inverse-CDF sampling: cumsum over the vocabulary, then a binary search over it.
    return 2 * clog2(_shape(node.args[0])[-1])


# ------------------------------------------------------------------------------------------------- the table

_DATA_OPS = """
view _unsafe_view reshape _reshape_alias expand expand_as permute transpose t unsqueeze squeeze slice select
narrow cat stack split split_with_sizes chunk unbind flatten unflatten repeat repeat_interleave flip roll
constant_pad_nd pad index index_select gather take take_along_dim embedding as_strided diagonal movedim
view_as clone contiguous detach alias lift_fresh_copy lift_fresh _to_copy to tril triu scatter index_put
index_copy slice_scatter select_scatter diagonal_scatter as_strided_scatter masked_scatter nonzero
masked_select unfold unsafe_split split_copy squeeze_copy unsqueeze_copy view_copy permute_copy
transpose_copy t_copy slice_copy select_copy expand_copy alias_copy unbind_copy _assert_tensor_metadata
_assert_scalar sym_size sym_numel sym_stride sym_storage_offset getitem
""".split()

_ELEMENTWISE_OPS = """
add sub rsub mul div neg abs exp exp2 expm1 log log1p log2 log10 sqrt rsqrt pow reciprocal sin cos tan tanh
sigmoid relu erf erfc erfinv sign sgn floor ceil round trunc frac remainder fmod maximum minimum fmax fmin eq
ne lt le gt ge logical_and logical_or logical_not logical_xor bitwise_and bitwise_or bitwise_not bitwise_xor
masked_fill isnan isinf isfinite nan_to_num square clamp_min clamp_max threshold hardsigmoid atan atan2 asin
acos sinh cosh asinh acosh atanh xlogy one_hot fill heaviside copysign logit
""".split()

_CONSTANT_OPS = """
arange zeros ones full empty empty_like zeros_like ones_like full_like new_zeros new_ones new_full new_empty
empty_strided scalar_tensor rand randn randint rand_like randn_like randint_like linspace eye tensor
""".split()

RULES: dict[str, Rule] = {}
RULES.update({f"aten.{op}": Rule("data", _const(0), "data movement") for op in _DATA_OPS})
RULES.update({f"aten.{op}": Rule("elementwise", _const(1), "elementwise") for op in _ELEMENTWISE_OPS})
RULES.update({f"aten.{op}": Rule("constant", _const(0), "no data dependency") for op in _CONSTANT_OPS})
RULES["getitem"] = Rule("data", _const(0), "tuple projection")


def _ops(rule: Rule, *ops: str) -> dict[str, Rule]:
    """One rule for several ATen ops (table keys ``aten.<op>``) that cost the same."""
    return {f"aten.{op}": rule for op in ops}


RULES.update(
    {
        "aten._to_copy": Rule("data", _to_copy, "dtype/device cast: re-encoding, 0 (JAX reference: 1)"),
        # Functionalised in-place copy: the result is ``src``; ``dst``'s old value is overwritten.
        **_ops(Rule("data", _const(0), "copy(dst, src) -> src", inputs=lambda n: [n.args[1]]), "copy", "copy_"),
        "aten.where": Rule("select", _where, "select_n over 2 choices: ceil(log2 2) = 1"),
        "aten.clamp": Rule("elementwise", _clamp, "max then min: 1 per bound"),
        "aten.hardtanh": Rule("elementwise", _const(2), "max then min"),
        "aten.silu": Rule("composite", _const(2), "x * sigmoid(x)"),
        "aten.gelu": Rule("composite", _gelu, "tanh form 8, erf form 5 (jax.nn.gelu's chain)"),
        "aten.softplus": Rule("composite", _const(2), "log1p(exp(x))"),
        "aten.leaky_relu": Rule("composite", _const(2), "mul, select"),
        "aten.elu": Rule("composite", _const(3), "expm1, mul, select"),
        "aten.mish": Rule("composite", _const(4), "x * tanh(softplus(x))"),
        "aten.lerp": Rule("composite", _const(3), "a + w * (b - a)"),
        "aten.addcmul": Rule("composite", _const(3), "self + value * t1 * t2"),
        "aten.addcdiv": Rule("composite", _const(3), "self + value * t1 / t2"),
        # contractions: ceil(log2 K) + 1 where K is the contracted size.
        **_ops(Rule("contraction", _matmul(0), "ceil(log2 K) + 1"), "mm", "bmm", "matmul", "mv", "dot", "vdot"),
        "aten.linear": Rule(
            "contraction", lambda n: _matmul(0)(n) + int(_arg(n, 2, "bias") is not None), "dot, bias add"
        ),
        **_ops(Rule("contraction", _matmul(1, extra=1), "dot (ceil(log2 K) + 1), then bias add"), "addmm", "addmv"),
        "aten.baddbmm": Rule("contraction", _matmul(1, extra=1), "dot (ceil(log2 K) + 1), then add"),
        "aten.addbmm": Rule(
            "contraction",
            lambda n: clog2(_shape(n.args[1])[0] * _shape(n.args[1])[-1]) + 2,
            "dot over batch*K, then add",
        ),
        **_ops(
            Rule("composite", _sdpa, "qk, scale, mask, softmax, pv"),
            "_scaled_dot_product_flash_attention_for_cpu",
            "_scaled_dot_product_flash_attention",
            "_scaled_dot_product_efficient_attention",
            "scaled_dot_product_attention",
            "_scaled_dot_product_attention_math",
        ),
        # reductions: ceil(log2 N).
        **_ops(
            Rule("reduction", lambda n: clog2(_reduced(n)), "ceil(log2 N)"),
            "sum",
            "nansum",
            "prod",
            "amax",
            "amin",
            "any",
            "all",
            "argmax",
            "argmin",
        ),
        **_ops(Rule("reduction", _max_min, "ceil(log2 N); elementwise overload 1"), "max", "min"),
        "aten.mean": Rule("reduction", lambda n: clog2(_reduced(n)) + 1, "jnp.mean: reduce_sum, div"),
        "aten.count_nonzero": Rule("reduction", lambda n: clog2(_reduced(n)) + 1, "ne, reduce_sum"),
        "aten.logsumexp": Rule("composite", _two_reductions(4), "max,sub,exp,sum,log,add"),
        **_ops(Rule("composite", _two_reductions(4), "mean, sub, square, sum, div"), "var", "var_mean"),
        **_ops(Rule("composite", _two_reductions(5), "var, then sqrt"), "std", "std_mean"),
        **_ops(
            Rule("composite", lambda n: clog2(_reduced(n, 2)) + 2, "|x|^p, sum, root"), "linalg_vector_norm", "norm"
        ),
        # SDPA's math path (what attention decomposes to on the meta device) uses _safe_softmax: a softmax whose
        # fully masked rows give 0 instead of NaN. That fix-up is a select on a mask-only condition, off the
        # scores' chain.
        **_ops(
            Rule("composite", lambda n: _softmax_cost(_last_or_dim(n, 1)), "max, sub, exp, sum, div: 2*ceil(log2 N)+3"),
            "_softmax",
            "softmax",
            "_safe_softmax",
        ),
        **_ops(
            Rule("composite", lambda n: _log_softmax_cost(_last_or_dim(n, 1)), "2*ceil(lg N)+4"),
            "_log_softmax",
            "log_softmax",
        ),
        **_ops(
            Rule("composite", _layer_norm, "2*(ceil(log2 N)+1) + 5, + scale, + bias"), "native_layer_norm", "layer_norm"
        ),
        **_ops(Rule("composite", _rms_norm, "square, mean, add, rsqrt, mul, + scale"), "_fused_rms_norm", "rms_norm"),
        # scans and selections over n: ceil(log2 n).
        **_ops(
            Rule("scan", lambda n: clog2(_last_or_dim(n, 1)), "parallel prefix: ceil(log2 n)"),
            "cumsum",
            "cumprod",
            "cummax",
            "cummin",
        ),
        "aten.logcumsumexp": Rule("scan", lambda n: clog2(_last_or_dim(n, 1)) + 2, "exp, prefix sum, log"),
        "aten.topk": Rule("scan", lambda n: clog2(_last_or_dim(n, 2)), "ceil(log2 n) as in the reference"),
        **_ops(
            Rule("scan", lambda n: clog2(_last_or_dim(n, 1)), "ceil(log2 n) (a sorting network is log^2)"),
            "sort",
            "argsort",
        ),
        "aten.searchsorted": Rule("scan", lambda n: clog2(_shape(n.args[0])[-1]), "binary search"),
        "aten.multinomial": Rule("scan", _multinomial, "cumsum + binary search over the vocabulary"),
    }
)

# The JAX reference charges convert_element_type 1.
REFERENCE_COMPAT_OVERRIDES: dict[str, Rule] = {
    "aten._to_copy": Rule(
        "elementwise",
        lambda n: int(n.kwargs.get("dtype") is not None and n.kwargs.get("dtype") != _val(n.args[0]).dtype),
        "convert_element_type: 1 when the dtype changes (JAX reference)",
    ),
}


def op_name(node: Node) -> str:
    """The rule-table key of a node: ``"aten.mm"``, ``"getitem"``, ``"serial_depth.interpretable"``..."""
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    if packet is not None:
        return str(packet)
    return getattr(target, "__name__", str(target))


def lookup_rule(name: str, table: dict[str, Rule]) -> Rule | None:
    """Finds the rule for ``name``, treating functionalisation's ``foo_copy`` and in-place ``foo_`` as ``foo``."""
    if name in table:
        return table[name]
    for suffix in ("_copy", "_"):
        if name.endswith(suffix) and name[: -len(suffix)] in table:
            return table[name[: -len(suffix)]]
    return None
