"""How every helper reads a layer, a stack and a selector argument: one resolver for each.

Layers. `resolve_layer` reads a layer as TransformerLens does, in the sense the argument has:

    kind        the int names                                   valid          -1 is
    "block"     a block (cache["resid_post", l], get_act_name,  -n .. n-1      the last block
                block_weights)
    "residual"  a point of the residual stream: l is the input  -(n+1) .. n    after the last block
                of block l, n is after the last block            (None too)
                (accumulated_resid, decompose_resid, logit_lens, stack_*_results,
                get_full_resid_decomposition, apply_ln_to_stack)
    "bound"     a bound of a partial pass, as blocks[start:stop] -n .. n        before the last block
                (start_at_layer, stop_at_layer)

In every sense a negative layer counts back as Python indexing (or slicing) does over what the argument
ranges over, so `-1` means what TransformerLens's `-1` means; anything outside the valid range is refused.

Stacks. `STACKS` lists every stack a hook name can start with; `check_stack` accepts those a model has.

Selectors. A `Selector` picks indices along one axis (steps, canvases, positions, heads, neurons,
batch rows): an int, a slice, a `(start, stop[, step])` tuple (a slice, as TransformerLens's `Slice`),
a list (or 1-D integer tensor) of ints, a 1-D bool mask, or "all" / None for everything. Ints count
back from the end as Python indexing does. `resolve_selector` is the one parser: it checks type, sign
and range against the axis's size and refuses a selection that picks nothing.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from typing import Literal

import torch

__all__ = [
    "STACKS",
    "LayerKind",
    "Selector",
    "check_selector",
    "check_stack",
    "index_axis",
    "model_stacks",
    "ordered_indices",
    "resolve_layer",
    "resolve_layers",
    "resolve_selector",
    "select_indices",
]

# ---------------------------------------------------------------------- stacks

#: Every stack a hook name can start with: DiffusionGemma's prompt encoder and canvas decoder, and the
#: single stack of its causal twin (`HookedGemma4CausalLM`).
STACKS = ("encoder", "decoder", "causal")


def model_stacks(model: object | None) -> tuple[str, ...]:
    """The stacks `model` has (every stack when there is no model to ask)."""
    return tuple(s for s in STACKS if model is None or hasattr(model, s))


def check_stack(stack: object, model: object | None = None) -> str:
    """`stack` when `model` has it (any of `STACKS` without a model); otherwise a ValueError naming them."""
    available = model_stacks(model)
    if not isinstance(stack, str) or stack not in available:
        raise ValueError(f"stack must be one of {', '.join(map(repr, available))}, got {stack!r}")
    return stack


# ---------------------------------------------------------------------- layers


def _as_index(value: object) -> int | None:
    """`value` as a Python int when it is an integer (not a bool, float or tensor), else None."""
    if isinstance(value, bool) or isinstance(value, torch.Tensor):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


LayerKind = Literal["block", "residual", "bound"]

# kind: (how far the largest index lies past n_layers - 1, how far a negative counts back past n_layers,
# what the valid values mean). A bound is a slice bound over the blocks: -1 stops before the last block.
_LAYER_SENSES = {
    "block": (0, 0, "a block index is 0..{hi} ({n} layers), or {lo}..-1 counting back from the last block"),
    "residual": (
        1,
        1,
        "a residual-stream layer is 0..{hi} (l: the input of block l; {hi}: after the last block), or "
        "{lo}..-1 counting back (-1 or None: after the last block, as TransformerLens)",
    ),
    "bound": (1, 0, "a partial-pass bound is 0..{hi} ({n} blocks), or {lo}..-1 counting back as blocks[start:stop]"),
}


def resolve_layer(layer: object, n_layers: int | None, *, what: str = "layer", kind: LayerKind = "block") -> int | None:
    """`layer` as a non-negative index in the sense `kind` gives it (see the module docstring).

    None stays None, except for "residual", where it means after the last block (`n_layers`). With
    `n_layers` None (nothing to count back from) a negative layer is refused. Raises TypeError for a
    non-int and ValueError out of range, naming the valid range.
    """
    if layer is None:
        return n_layers if kind == "residual" else None
    index = _as_index(layer)
    if index is None:
        hint = f"; pass stack={layer!r} by keyword" if isinstance(layer, str) and layer in STACKS else ""
        raise TypeError(f"{what} must be an int or None, got {layer!r}{hint}")
    layer = index
    if n_layers is None:
        if layer < 0:
            raise ValueError(
                f"{what}={layer}: negative layers count back from the model's layer count, which is not known "
                f"here; pass n_layers + ({layer}), or index a cache with a model attached"
            )
        return layer
    past_top, past_back, valid = _LAYER_SENSES[kind]
    hi, back = n_layers - 1 + past_top, n_layers + past_back
    if not -back <= layer <= hi:
        raise ValueError(f"{what}={layer} is out of range: {valid.format(hi=hi, lo=-back, n=n_layers)}")
    return layer + back if layer < 0 else layer


def resolve_layers(layers: Iterable[object] | None, n_layers: int | None, what: str = "layers") -> list[int]:
    """Block indices, each through `resolve_layer` (kind "block"); None is every block."""
    if layers is None:
        if n_layers is None:
            raise ValueError(f"{what}=None means every layer, but the layer count is not known here; list them")
        return list(range(n_layers))
    if isinstance(layers, (str, bytes)) or _as_index(layers) is not None or not hasattr(layers, "__iter__"):
        raise TypeError(f"{what} must be a list of block indices or None, got {layers!r}")
    return [resolve_layer(layer, n_layers, what=what, kind="block") for layer in layers]


# ---------------------------------------------------------------------- selectors

#: Indices along one axis: an int, a slice, a (start, stop[, step]) tuple (a slice, as TransformerLens),
#: a list or 1-D integer tensor of ints, a 1-D bool mask, or "all" / None for everything.
Selector = int | slice | tuple | Sequence[int] | torch.Tensor | str | None

_SELECTOR_FORMS = (
    "an int, a slice, a (start, stop[, step]) tuple, a list of ints, a 1-D integer tensor, a 1-D bool mask or 'all'"
)


def _check_slice(selector: slice, what: str) -> None:
    for part in (selector.start, selector.stop, selector.step):
        if part is not None and _as_index(part) is None:
            raise TypeError(f"{what}={selector!r}: slice bounds must be ints or None, got {part!r}")
    if selector.step == 0:
        raise ValueError(f"{what}={selector!r}: a slice step cannot be zero")


def check_selector(selector: object, what: str) -> None:
    """Refuse (TypeError) a selector of the wrong type, before any size is known, naming the bad part."""
    if selector is None or (isinstance(selector, str) and selector == "all"):
        return
    if isinstance(selector, str) or isinstance(selector, bool):
        raise TypeError(f"{what} must be {_SELECTOR_FORMS}; got {selector!r}")
    if _as_index(selector) is not None:
        return
    if isinstance(selector, slice):
        return _check_slice(selector, what)
    if isinstance(selector, tuple):
        if not 1 <= len(selector) <= 3:
            raise TypeError(
                f"{what} must be {_SELECTOR_FORMS}; got {selector!r} (a tuple is a (start, stop[, step]) slice, as "
                "TransformerLens's: pass several indices as a list)"
            )
        return _check_slice(slice(*selector), what)
    if isinstance(selector, torch.Tensor):
        if selector.is_floating_point() or selector.is_complex() or selector.ndim > 1:
            raise TypeError(
                f"{what} must be {_SELECTOR_FORMS}; got a {selector.ndim}-D {selector.dtype} tensor: pass "
                "integer positions (e.g. tensor.long()) or a 1-D bool mask"
            )
        if selector.dtype == torch.bool and selector.ndim == 0:
            raise TypeError(f"{what}: a bool mask must be 1-D, one entry per index, got a 0-D bool tensor")
        return
    if not isinstance(selector, (Sequence, set, frozenset)) and not hasattr(selector, "tolist"):
        raise TypeError(f"{what} must be {_SELECTOR_FORMS}; got {type(selector).__name__} {selector!r}")
    for item in _listed(selector):
        if _as_index(item) is None:
            fix = (
                "pass a bool mask as a tensor, torch.tensor([...])"
                if isinstance(item, bool)
                else "pass whole indices, e.g. [0, 1]"
            )
            raise TypeError(f"{what}={selector!r}: {item!r} is not an int index; {fix}")


def _listed(selector: object) -> list:
    if isinstance(selector, (set, frozenset)):
        return sorted(selector)
    if hasattr(selector, "tolist") and not isinstance(selector, Sequence):
        listed = selector.tolist()  # a numpy array
        return listed if isinstance(listed, list) else [listed]
    return list(selector)  # type: ignore[call-overload]


def _out_of_range(what: str, value: object, size: int, size_name: str) -> ValueError:
    return ValueError(
        f"{what}={value!r} is out of range for {size} {size_name}: use 0..{size - 1}, or -{size}..-1 to count "
        "back from the end"
    )


def _nothing(what: str, value: object, size: int | None, size_name: str) -> ValueError:
    of = f" of {size} {size_name}" if size is not None else ""
    return ValueError(f"{what}={value!r} selects nothing{of}; pick at least one index, or pass 'all' / None")


def _checked_index(value: int, size: int | None, what: str, size_name: str, shown: object) -> int:
    if size is None:
        if value < 0:
            raise ValueError(
                f"{what}={shown!r}: negative indices count back from a size not known here; pass the index "
                "counted from 0"
            )
        return value
    if not -size <= value < size:
        raise _out_of_range(what, shown, size, size_name)
    return value + size if value < 0 else value


#: Where the size of the axis is not known (size=None), an open slice runs to this many indices.
UNBOUNDED = 1 << 16


def _checked_slice(selector: slice, size: int | None, what: str, size_name: str) -> slice:
    if size is None:
        if any(part is not None and part < 0 for part in (selector.start, selector.stop, selector.step)):
            raise ValueError(
                f"{what}={selector!r}: negative bounds and steps count back from a size not known here; pass "
                "bounds counted from 0"
            )
    elif selector.start is not None and not -size <= selector.start < size:
        raise _out_of_range(what, selector, size, size_name)
    if not range(UNBOUNDED if size is None else size)[selector]:
        raise _nothing(what, selector, size, size_name)
    return selector


def resolve_selector(
    selector: Selector, size: int | None, what: str, size_name: str = "indices"
) -> int | slice | list[int] | None:
    """`selector` checked against an axis of `size` (None: not known, so counting back is refused) and
    normalised: None for everything; a non-negative int; a slice that selects something; or a list of
    non-negative ints in the given order. A slice's start must lie on the axis (its stop is clamped, as
    Python slicing does); a bool mask must have one entry per index. `what` names the argument and
    `size_name` what the size counts (e.g. "canvas positions (canvas_length)") in the errors."""
    check_selector(selector, what)
    if selector is None or isinstance(selector, str):
        return None
    index = _as_index(selector)
    if index is not None:
        return _checked_index(index, size, what, size_name, selector)
    if isinstance(selector, (slice, tuple)):
        return _checked_slice(selector if isinstance(selector, slice) else slice(*selector), size, what, size_name)
    if isinstance(selector, torch.Tensor) and selector.dtype == torch.bool:
        if size is not None and selector.numel() != size:
            raise ValueError(
                f"{what}: a bool mask needs one entry per index ({size} {size_name}), got {selector.numel()}"
            )
        indices = selector.nonzero().flatten().tolist()
    elif isinstance(selector, torch.Tensor) and selector.ndim == 0:
        return _checked_index(int(selector), size, what, size_name, selector)
    else:
        indices = [
            _checked_index(int(i), size, what, size_name, selector)
            for i in (selector.tolist() if isinstance(selector, torch.Tensor) else _listed(selector))
        ]
    if not indices:
        raise _nothing(what, selector, size, size_name)
    return indices


def ordered_indices(selector: Selector, size: int | None, what: str, size_name: str = "indices") -> list[int] | None:
    """The indices `selector` picks out of `size`, in its order (None: everything), checked as `resolve_selector`."""
    resolved = resolve_selector(selector, size, what, size_name)
    if resolved is None or isinstance(resolved, list):
        return resolved
    if isinstance(resolved, int):
        return [resolved]
    return list(range(UNBOUNDED if size is None else size)[resolved])


def select_indices(selector: Selector, size: int | None, what: str, size_name: str = "indices") -> set[int] | None:
    """The set of indices `selector` picks out of `size` (None: everything), checked as `resolve_selector`."""
    ordered = ordered_indices(selector, size, what, size_name)
    return None if ordered is None else set(ordered)


def index_axis(
    tensor: torch.Tensor, selector: Selector, axis: int, what: str, size_name: str = "entries on that axis"
) -> torch.Tensor:
    """`tensor` indexed along `axis` by `selector`, checked against that axis (an int drops the axis, as
    TransformerLens's `Slice`; a list keeps its order)."""
    dim = axis % tensor.ndim
    resolved = resolve_selector(selector, tensor.shape[dim], what, size_name)
    if resolved is None:
        return tensor
    if isinstance(resolved, slice) and (resolved.step or 1) > 0:
        return tensor[(slice(None),) * dim + (resolved,)]
    if isinstance(resolved, int):
        return tensor[(slice(None),) * dim + (resolved,)]
    if isinstance(resolved, slice):  # a negative step: torch slices only forwards
        resolved = list(range(tensor.shape[dim])[resolved])
    return tensor.index_select(dim, torch.as_tensor(resolved, dtype=torch.long, device=tensor.device))


def axis_keeping(selector: Selector) -> tuple[Selector, bool]:
    """`selector` as one that keeps its axis (a single index becomes a one-entry list), and whether the
    original drops the axis: building from the kept form then squeezing slices before materialising."""
    index = _as_index(selector)
    if index is None and isinstance(selector, torch.Tensor) and selector.ndim == 0 and selector.dtype != torch.bool:
        index = int(selector)
    return ([index], True) if index is not None else (selector, False)
