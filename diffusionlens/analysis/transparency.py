"""Variable transparency: how readable is what self-conditioning carries from step to step?

All functions read a `CanvasTrace` recorded with `generate(..., record_top_k=k)`: its top-k tokens
and probabilities at each step are exactly the distribution the next step receives through
self-conditioning (before any bottleneck).
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int, Real

from diffusionlens.sampling.trace import CanvasTrace


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


def bootstrap_weights(n: int, n_boot: int, seed: int = 0) -> Int[torch.Tensor, "boot n"]:
    """How often each of `n` items is drawn in each of `n_boot` bootstrap resamples (rows sum to n).

    Pass the same weights to `weighted_auroc` for several monitors or models scored on the same problems
    to get paired resamples (differences between them keep their correlation)."""
    if n < 1 or n_boot < 1:
        raise ValueError(f"need n >= 1 and n_boot >= 1, got n={n}, n_boot={n_boot}")
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, n, (n_boot, n), generator=generator)
    return torch.zeros(n_boot, n, dtype=torch.long).scatter_add_(1, draws, torch.ones_like(draws))


def weighted_auroc(
    scores: Real[torch.Tensor, " n"], labels: Bool[torch.Tensor, " n"], weights: Real[torch.Tensor, "boot n"]
) -> Float[torch.Tensor, " boot"]:
    """`auroc` of each weighted resample at once (item i counted weights[b, i] times; ties count half).

    O(boot × n) after one sort of the scores, so thousands of resamples of thousands of problems are
    cheap where the pairwise `auroc` is not. NaN where a resample has only one class."""
    scores, labels = scores.flatten().double(), labels.flatten().bool()
    weights = weights.double()
    if weights.ndim != 2 or weights.shape[1] != scores.shape[0]:
        raise ValueError(f"weights must be [boot, {scores.shape[0]}], got {tuple(weights.shape)}")
    # tie groups of equal scores, in increasing order
    _, group = torch.unique(scores, sorted=True, return_inverse=True)
    n_groups = int(group.max()) + 1 if len(group) else 0
    index = group.expand_as(weights)
    pos = torch.zeros(weights.shape[0], n_groups, dtype=torch.double).scatter_add_(1, index, weights * labels)
    neg = torch.zeros(weights.shape[0], n_groups, dtype=torch.double).scatter_add_(1, index, weights * ~labels)
    below = torch.cumsum(neg, dim=1) - neg  # negative weight strictly below each group
    area = (pos * (below + 0.5 * neg)).sum(1)
    total = pos.sum(1) * neg.sum(1)
    return torch.where(total > 0, area / total.clamp(min=1e-300), torch.full_like(area, float("nan")))


def auroc_ci(
    scores: Real[torch.Tensor, " n"],
    labels: Bool[torch.Tensor, " n"],
    *,
    weights: Real[torch.Tensor, "boot n"] | None = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(AUROC, lower, upper): the point estimate and a percentile bootstrap interval over items (resamples
    with one class only are left out). `weights` (from `bootstrap_weights`) pairs the resamples with
    another call's."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    weights = bootstrap_weights(len(scores), n_boot, seed) if weights is None else weights
    boot = weighted_auroc(scores, labels, weights)
    boot = boot[~torch.isnan(boot)]
    point = auroc(scores, labels)
    if len(boot) == 0:
        return point, float("nan"), float("nan")
    lo, hi = torch.quantile(boot, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=boot.dtype)).tolist()
    return point, lo, hi
