"""The denoising loss: cross-entropy of the canvas logits against the clean canvas.

One function for everyone who scores a canvas (`model(..., return_type="loss")`, the toy trainer),
so that a loss read off the model is the loss the toy was trained on.

Targets follow transformers' convention: `IGNORE_INDEX` (-100) marks a position that does not count,
exactly as `torch.nn.functional.cross_entropy(..., ignore_index=-100)` with a mean reduction (it is
left out of the numerator and the denominator). Any other id outside `[0, vocab)` is refused.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch.nn import functional as F

IGNORE_INDEX = -100
"""A target equal to this does not count towards the loss (transformers' and torch's ignore_index)."""


def check_targets(targets: object, vocab_size: int, shape: tuple[int, ...] | None = None) -> None:
    """Refuse targets that are not integer ids in `[0, vocab_size)` or `IGNORE_INDEX`, naming the first
    bad id, where it is and the vocabulary size; `shape`, if given, is the `[batch, canvas]` expected."""
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32, torch.int16):
        raise TypeError(f"targets must be an integer tensor of token ids [batch, canvas], got {_kind(targets)}")
    if shape is not None and tuple(targets.shape) != tuple(shape):
        raise ValueError(
            f"targets has shape {tuple(targets.shape)}; expected {tuple(shape)} [batch, canvas]: "
            "the clean canvas, one token id per position"
        )
    bad = ((targets < 0) & (targets != IGNORE_INDEX)) | (targets >= vocab_size)
    if targets.numel() and bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"targets{list(where)} = {int(targets[where])} is not a token id: the vocabulary has {vocab_size} ids "
            f"[0, {vocab_size}); use {IGNORE_INDEX} (transformers' ignore value) for a position that must not count"
        )


def denoising_loss(
    logits: Float[torch.Tensor, "batch canvas vocab"],
    targets: Int[torch.Tensor, "batch canvas"],
    loss_mask: Bool[torch.Tensor, "batch canvas"] | None = None,
    weights: Float[torch.Tensor, "batch canvas"] | None = None,
    pad_token_id: int | None = None,
    spread_targets: Float[torch.Tensor, "batch canvas vocab"] | None = None,
) -> Float[torch.Tensor, ""]:
    """Weighted mean over canvas positions of `cross_entropy(logits, targets)`.

    Which positions count: `loss_mask` (True = counts) if given; otherwise every position whose
    target is not `pad_token_id` (all positions when `pad_token_id` is None). Targets equal to
    `IGNORE_INDEX` (-100) never count, as in transformers. `weights` (>= 0) scale the counted positions
    (the toy trainer down-weights pads instead of dropping them). The mean is `sum(ce * w) / sum(w)`
    with `w` the weights times the mask, computed over the flattened canvas. `spread_targets`: where a
    position's row is not zero, its cross-entropy is against that distribution instead of its target id (the
    toy organism's hedged positions, `diffusionlens.toy.hedges`).
    """
    if logits.ndim != 3:
        raise ValueError(f"logits must be [batch, canvas, vocab], got shape {tuple(logits.shape)}")
    check_targets(targets, logits.shape[-1], tuple(logits.shape[:2]))
    for name, value in (("loss_mask", loss_mask), ("weights", weights)):
        if value is not None and value.shape != targets.shape:
            raise ValueError(
                f"{name} has shape {tuple(value.shape)}; expected {tuple(targets.shape)}, one entry per canvas position"
            )
    if loss_mask is not None and loss_mask.dtype != torch.bool:
        raise TypeError(f"loss_mask must be boolean (True = position counts), got {loss_mask.dtype}; use weights=")
    if weights is not None:
        check_loss_weights(weights)
    if spread_targets is not None:
        check_spread_targets(spread_targets, tuple(logits.shape))
    targets = targets.to(device=logits.device, dtype=torch.long)
    mask_given = loss_mask
    ignored = targets == IGNORE_INDEX
    if not bool(ignored.any()):
        ignored = None  # the usual case: no extra mask, so the arithmetic is exactly what it was before
    if loss_mask is None and pad_token_id is not None:
        loss_mask = targets != pad_token_id
    if ignored is not None:
        loss_mask = ~ignored if loss_mask is None else loss_mask.to(targets.device) & ~ignored
    # cross_entropy gives 0 at IGNORE_INDEX targets (its default ignore_index); the mask keeps them
    # out of the denominator too.
    per_position = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    if spread_targets is not None:
        spread = spread_targets.to(logits.device).flatten(0, 1)
        spread_ce = -(torch.log_softmax(logits.flatten(0, 1), dim=-1) * spread).sum(-1)
        per_position = torch.where(spread.sum(-1) > 0, spread_ce, per_position)
    # Build the weight only from what was given, so that a weights-only call (the trainer's) is the
    # plain weighted mean with no extra multiplication by ones.
    if weights is None and loss_mask is None:
        weight = torch.ones_like(per_position)
    elif loss_mask is None:
        weight = weights.to(per_position.device).flatten()
    elif weights is None:
        weight = loss_mask.to(device=per_position.device, dtype=per_position.dtype).flatten()
    else:
        weight = (weights.to(per_position.device) * loss_mask.to(per_position.device)).flatten()
    total = weight.sum()
    if not bool(total > 0):
        raise ValueError(_nothing_counts(targets, mask_given, weights, pad_token_id, ignored))
    return (per_position * weight).sum() / total


def check_spread_targets(spread: object, logits_shape: tuple[int, ...]) -> None:
    """Spread targets must be a float tensor shaped like the logits whose rows are each a distribution
    (summing to 1) or all zero (the position keeps its target id)."""
    if not isinstance(spread, torch.Tensor) or not spread.is_floating_point():
        raise TypeError(f"spread_targets must be a float tensor [batch, canvas, vocab], got {_kind(spread)}")
    if tuple(spread.shape) != logits_shape:
        raise ValueError(f"spread_targets has shape {tuple(spread.shape)}; expected the logits' {logits_shape}")
    totals = spread.sum(-1)
    rows_ok = (spread >= 0).all(-1) & ((totals - 1).abs() < 1e-4) | (totals == 0)
    if not bool(rows_ok.all()):
        raise ValueError("each row of spread_targets must be a distribution (>= 0, summing to 1) or all zeros")


def check_loss_weights(weights: object) -> None:
    """Loss weights must be a float tensor of finite values >= 0 (a weighted mean with negative weights
    is no mean at all)."""
    if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
        raise TypeError(f"loss_weights must be a float tensor [batch, canvas], got {_kind(weights)}")
    if weights.numel() and not bool((torch.isfinite(weights) & (weights >= 0)).all()):
        bad = ~(torch.isfinite(weights) & (weights >= 0))
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"loss_weights{list(where)} = {float(weights[where])}: weights must be finite and >= 0 "
            "(0 drops a position; use loss_mask= to choose positions)"
        )


def _nothing_counts(
    targets: torch.Tensor,
    mask_given: torch.Tensor | None,
    weights: torch.Tensor | None,
    pad_token_id: int | None,
    ignored: torch.Tensor | None,
) -> str:
    """Why no position counts, for the error message (computed only when it is raised)."""
    head = "no canvas position counts towards the loss"
    if ignored is not None and bool(ignored.all()):
        return f"{head}: every target is {IGNORE_INDEX} (the ignore value); give at least one real target id"
    if mask_given is not None and not bool(mask_given.any()):
        return f"{head}: loss_mask has no True entry; pass a loss_mask with at least one True entry"
    if mask_given is None and pad_token_id is not None:
        padding = targets == pad_token_id
        if ignored is not None:
            padding = padding | ignored
        if bool(padding.all()):
            return (
                f"{head}: every target is padding (pad_token_id={pad_token_id})"
                + (f" or {IGNORE_INDEX}" if ignored is not None else "")
                + "; pass a loss_mask with at least one True entry to score pad positions"
            )
    if weights is not None:
        return f"{head}: loss_weights are 0 at every position that counts; give one of them a weight > 0"
    return f"{head}: the loss_mask's True entries all have ignored ({IGNORE_INDEX}) targets; count a real target"


def _kind(value: object) -> str:
    return str(value.dtype) if isinstance(value, torch.Tensor) else type(value).__name__
