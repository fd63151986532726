"""RMSNorm exactly as DiffusionGemma computes it (fp32 statistics, `pow(-0.5)` rather than rsqrt)."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import nn

from diffusionlens.hook_points import HookPoint


def rms_normalize(x: Float[torch.Tensor, "... d"], eps: float) -> Float[torch.Tensor, "... d"]:
    """Scale-free RMS normalisation in fp32 (the caller casts back)."""
    x = x.float()
    # pow(-0.5) instead of rsqrt: the reference chose it to match JAX, and we match the reference.
    return x * torch.pow(x.pow(2).mean(-1, keepdim=True) + eps, -0.5)


class RMSNorm(nn.Module):
    """RMSNorm with an optional learned scale; `hook_normalized` sees the output."""

    def __init__(self, dim: int, eps: float, with_scale: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None
        self.hook_normalized = HookPoint()

    def forward(self, x: Float[torch.Tensor, "... d"]) -> Float[torch.Tensor, "... d"]:
        out = rms_normalize(x, self.eps)
        if self.weight is not None:
            out = out * self.weight.float()
        return self.hook_normalized(out.type_as(x))
