"""Variable transparency: how readable is what self-conditioning carries from step to step?

All functions read a `CanvasTrace` recorded with `generate(..., record_top_k=k)`: its top-k tokens
and probabilities at each step are exactly the distribution the next step receives through
self-conditioning (before any bottleneck).
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float

from diffusionlens.trace import CanvasTrace


def _need_top_k(trace: CanvasTrace, k: int = 1) -> None:
    if trace.top_k_probs is None or trace.top_k_probs.shape[-1] < k:
        have = 0 if trace.top_k_probs is None else trace.top_k_probs.shape[-1]
        raise ValueError(f"this trace kept the top {have} tokens per position; generate with record_top_k>={k}")


def top_k_mass(trace: CanvasTrace, k: int) -> Float[torch.Tensor, "step batch canvas"]:
    """Probability mass of the k most likely tokens of each step's self-conditioning distribution."""
    _need_top_k(trace, k)
    return trace.top_k_probs[..., :k].sum(-1)


def top1_matches_final(trace: CanvasTrace, window: int = 0) -> Bool[torch.Tensor, "step batch canvas"]:
    """Whether each step's most likely token equals a token of the final canvas at the same position
    (window=0) or within ±window positions."""
    _need_top_k(trace)
    top1 = trace.top_k_tokens[..., 0]
    final = trace.final
    length = final.shape[-1]
    match = torch.zeros_like(top1, dtype=torch.bool)
    for shift in range(-window, window + 1):
        lo, hi = max(0, shift), min(length, length + shift)
        # final[p + shift] compared with top1[p]
        match[..., lo - shift : hi - shift] |= top1[..., lo - shift : hi - shift] == final[None, :, lo:hi]
    return match


def transparency_summary(trace: CanvasTrace, ks: tuple[int, ...] = (1, 4)) -> dict[str, torch.Tensor]:
    """Per-step means over rows and positions: top-k mass for each k, top-1 = final (exact, ±2)."""
    out = {f"top{k}_mass": top_k_mass(trace, k).mean((1, 2)) for k in ks}
    out["top1_is_final"] = top1_matches_final(trace).float().mean((1, 2))
    out["top1_near_final"] = top1_matches_final(trace, window=2).float().mean((1, 2))
    return out


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (ties count half); nan when only one class is present."""
    scores, labels = scores.flatten().double(), labels.flatten().bool()
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))
