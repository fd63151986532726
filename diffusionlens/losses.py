"""The denoising loss: cross-entropy of the canvas logits against the clean canvas.

One function for everyone who scores a canvas (`model(..., return_type="loss")`, the toy trainer),
so that a loss read off the model is the loss the toy was trained on.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch.nn import functional as F


def denoising_loss(
    logits: Float[torch.Tensor, "batch canvas vocab"],
    targets: Int[torch.Tensor, "batch canvas"],
    loss_mask: Bool[torch.Tensor, "batch canvas"] | None = None,
    weights: Float[torch.Tensor, "batch canvas"] | None = None,
    pad_token_id: int | None = None,
) -> Float[torch.Tensor, ""]:
    """Weighted mean over canvas positions of `cross_entropy(logits, targets)`.

    Which positions count: `loss_mask` (True = counts) if given; otherwise every position whose
    target is not `pad_token_id` (all positions when `pad_token_id` is None). `weights` scale the
    counted positions (the toy trainer down-weights pads instead of dropping them). The mean is
    `sum(ce * w) / sum(w)` with `w` the weights times the mask, computed over the flattened canvas.
    """
    if logits.ndim != 3:
        raise ValueError(f"logits must be [batch, canvas, vocab], got shape {tuple(logits.shape)}")
    if targets.shape != logits.shape[:2]:
        raise ValueError(
            f"targets has shape {tuple(targets.shape)} but the logits are {tuple(logits.shape)}; "
            f"pass the clean canvas, one token id per position: shape {tuple(logits.shape[:2])}"
        )
    if targets.dtype not in (torch.int64, torch.int32, torch.int16):
        raise TypeError(f"targets must be integer token ids, got {targets.dtype}")
    for name, value in (("loss_mask", loss_mask), ("weights", weights)):
        if value is not None and value.shape != targets.shape:
            raise ValueError(
                f"{name} has shape {tuple(value.shape)}; expected {tuple(targets.shape)}, one entry per canvas position"
            )
    if loss_mask is not None and loss_mask.dtype != torch.bool:
        raise TypeError(f"loss_mask must be boolean (True = position counts), got {loss_mask.dtype}; use weights=")
    targets = targets.to(device=logits.device, dtype=torch.long)
    if loss_mask is None and pad_token_id is not None:
        loss_mask = targets != pad_token_id
    per_position = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
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
        raise ValueError(
            "no canvas position counts towards the loss (every target is padding or masked out); "
            "pass a loss_mask with at least one True entry"
        )
    return (per_position * weight).sum() / total
