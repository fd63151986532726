"""The interpretable token bottleneck for self-conditioning.

Between steps, DiffusionGemma feeds its full (temperature-scaled) logits back as a continuous
signal. The bottleneck keeps only the top-k tokens, or the smallest set whose probability reaches
top-p, of every position's distribution and renormalises over them: whatever the next step
receives is then a short, readable list of weighted tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float


@dataclass(frozen=True)
class TokenBottleneck:
    """Keep the `top_k` most likely tokens and/or the top-`top_p` nucleus per position.

    Use it as `model.generate(..., bottleneck=TokenBottleneck(top_k=4))`, or as an ordinary hook:
    `fwd_hooks=[("decoder.self_cond.hook_logits_in", TokenBottleneck(top_k=4).hook)]`.
    """

    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if self.top_k is None and self.top_p is None:
            raise ValueError("TokenBottleneck needs top_k, top_p or both")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def keep_mask(self, logits: Float[torch.Tensor, "... vocab"]) -> torch.Tensor:
        """True for the tokens the bottleneck lets through."""
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        keep_sorted = torch.ones_like(sorted_logits, dtype=torch.bool)
        if self.top_k is not None:
            keep_sorted[..., self.top_k :] = False
        if self.top_p is not None:
            probs = torch.softmax(sorted_logits.float(), dim=-1)
            before = probs.cumsum(-1) - probs  # mass of the more likely tokens
            keep_sorted &= before < self.top_p  # the token that crosses top_p is kept
        return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)

    def __call__(self, logits: Float[torch.Tensor, "... vocab"]) -> Float[torch.Tensor, "... vocab"]:
        """Logits whose softmax is the renormalised distribution over the kept tokens (others get
        the dtype's most negative value, so their probability is exactly zero)."""
        return logits.masked_fill(~self.keep_mask(logits), torch.finfo(logits.dtype).min)

    def hook(self, logits: torch.Tensor, hook=None) -> torch.Tensor:
        return self(logits)

    def __str__(self) -> str:
        parts = [f"top_k={self.top_k}"] if self.top_k is not None else []
        parts += [f"top_p={self.top_p}"] if self.top_p is not None else []
        return "TokenBottleneck(" + ", ".join(parts) + ")"
