"""Argument checks for partial passes (`stop_at_layer` / `start_at_layer`) and `return_type`.

The passes themselves live in the stacks (`EncoderStack.run_blocks`, `DecoderStack.run_blocks`):
each rebuilds positions and masks from the PromptState, so running blocks [0, l) and then [l, n)
is bit-identical to one full pass, and a patch at block l need rerun only blocks >= l.
"""

from __future__ import annotations

import torch

RETURN_TYPES = ("logits", "loss", "both", None)


def check_layer_order(start: int | None, stop: int | None) -> None:
    if start is not None and stop is not None and stop < start:
        raise ValueError(f"stop_at_layer={stop} comes before start_at_layer={start}; blocks run forwards")


def check_residual(resid: object, expected: tuple[int, ...], what: str) -> torch.Tensor:
    """A residual stream passed to `start_at_layer`: a float tensor of exactly `expected` shape."""
    if not isinstance(resid, torch.Tensor) or not resid.is_floating_point():
        raise TypeError(
            f"with start_at_layer, {what} is the residual stream: a float tensor of shape {expected} "
            f"[batch, pos, d_model], got {getattr(resid, 'dtype', type(resid).__name__)}"
        )
    if tuple(resid.shape) != expected:
        raise ValueError(
            f"the residual passed to start_at_layer has shape {tuple(resid.shape)}; expected {expected} "
            f"[batch, pos, d_model] (what stop_at_layer returns)"
        )
    return resid


def check_return_type(return_type: str | None, targets: object, stop_at_layer: int | None) -> None:
    if return_type not in RETURN_TYPES:
        raise ValueError(f"return_type={return_type!r}; choose one of {RETURN_TYPES}")
    if return_type in ("loss", "both") and targets is None:
        raise ValueError(
            f"return_type={return_type!r} needs targets=: the clean canvas ids [batch, canvas] "
            "to score the logits against"
        )
    if stop_at_layer is not None and return_type in ("loss", "both"):
        raise ValueError(
            "stop_at_layer returns the residual stream before that block, so there are no logits to take a "
            "loss of; drop stop_at_layer or use return_type='logits'"
        )
