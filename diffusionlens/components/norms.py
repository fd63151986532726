"""RMSNorm exactly as DiffusionGemma computes it (fp32 statistics, `pow(-0.5)` rather than rsqrt)."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import nn

from diffusionlens.hooks.points import HookPoint

#: The dtype every RMS norm computes in, as the reference does (float64 checks of exact linear maps
#: patch it to torch.float64).
COMPUTE_DTYPE = torch.float32


def _scale_in_compute_dtype(x: Float[torch.Tensor, "... d"], eps: float) -> Float[torch.Tensor, "... 1"]:
    """The per-row factor 1/rms(x) an RMS norm multiplies by; `x` is already in COMPUTE_DTYPE."""
    # pow(-0.5) instead of rsqrt: the reference chose it to match JAX, and we match the reference.
    return torch.pow(x.pow(2).mean(-1, keepdim=True) + eps, -0.5)


def rms_normalize(x: Float[torch.Tensor, "... d"], eps: float) -> Float[torch.Tensor, "... d"]:
    """Scale-free RMS normalisation in fp32 (the caller casts back)."""
    # One fp32 copy of x serves both the statistics and the product: in a 16-bit model a second
    # conversion is a full extra copy of the hidden state per norm (the surplus copies in the 26B GPU profile).
    x = x.to(COMPUTE_DTYPE)
    return x * _scale_in_compute_dtype(x, eps)


class RMSNorm(nn.Module):
    """RMSNorm with an optional learned scale; `hook_normalized` sees the output.

    With `scale_hook=True` (the norms whose output joins the residual stream or the unembedding),
    `hook_scale` `[..., 1]` sees the factor 1/rms(x), so that, in the compute dtype (fp32),
    `norm(x) = (x * scale * gain).to(x.dtype)` exactly: with a cached scale the norm is a linear map,
    and anything summed into x can be pushed through it term by term.
    """

    def __init__(self, dim: int, eps: float, with_scale: bool = True, scale_hook: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None
        self.hook_scale = HookPoint() if scale_hook else None
        self.hook_normalized = HookPoint()

    def forward(self, x: Float[torch.Tensor, "... d"]) -> Float[torch.Tensor, "... d"]:
        # The same operations, in the same order, as rms_normalize: the output is bit-identical
        # whether or not hook_scale is read.
        x_computed = x.to(COMPUTE_DTYPE)
        scale = _scale_in_compute_dtype(x_computed, self.eps)
        if self.hook_scale is not None:
            scale = self.hook_scale(scale)
        out = x_computed.to(scale.dtype) * scale
        if self.weight is not None:
            out = out * self.weight.to(scale.dtype)
        return self.hook_normalized(out.type_as(x))
