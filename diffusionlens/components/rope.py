"""Rotary position embeddings: default RoPE on sliding layers, proportional RoPE on full layers."""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import nn

from diffusionlens.config import FULL, SLIDING, DiffusionGemmaConfig


class RotaryEmbedding(nn.Module):
    """Computes (cos, sin) tables per layer type from position ids; the frequencies are derived buffers."""

    def __init__(self, cfg: DiffusionGemmaConfig) -> None:
        super().__init__()
        self._cfg = cfg
        for name, value in self.derived_buffers().items():
            self.register_buffer(name, value, persistent=False)

    def derived_buffers(self) -> dict[str, torch.Tensor]:
        """Buffers computed from the config, never stored in checkpoints."""
        return {f"{kind}_inv_freq": self._cfg.rotary_inv_freq(kind) for kind in (SLIDING, FULL)}

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - nn.Module's signature
        # Frequencies stay float32 when the model is cast to 16 bits (`model.to(torch.bfloat16)`,
        # `from_config(dtype=)`), as transformers' bf16 checkpoints keep them: bf16 frequencies move every
        # angle and with it every logit. Moves between devices, and float64, still apply.
        super()._apply(fn, recurse)
        for name in list(self._buffers):
            if self._buffers[name].dtype in (torch.bfloat16, torch.float16):
                self._buffers[name] = self.derived_buffers()[name].to(self._buffers[name].device)
        return self

    @torch.no_grad()
    def forward(
        self, positions: Int[torch.Tensor, "batch pos"], layer_type: str, dtype: torch.dtype
    ) -> tuple[Float[torch.Tensor, "batch pos d_head"], Float[torch.Tensor, "batch pos d_head"]]:
        inv_freq = getattr(self, f"{layer_type}_inv_freq")
        freqs = positions[..., None].float() * inv_freq.to(device=positions.device, dtype=torch.float)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(
    x: Float[torch.Tensor, "batch pos head d_head"],
    cos: Float[torch.Tensor, "#batch pos d_head"],
    sin: Float[torch.Tensor, "#batch pos d_head"],
) -> Float[torch.Tensor, "batch pos head d_head"]:
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + rotate_half(x) * sin
