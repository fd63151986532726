"""Token embedding scaled by sqrt(d_model), the scale rounded to the weights' dtype as the reference does; and
the `dtype` / `device` every model reads from its token embedding."""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import nn

from diffusionlens.config import DiffusionGemmaConfig


class Embed(nn.Module):
    def __init__(self, cfg: DiffusionGemmaConfig) -> None:
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))
        self._embed_scale = cfg.embed_scale
        for name, value in self.derived_buffers().items():
            self.register_buffer(name, value, persistent=False)

    def derived_buffers(self) -> dict[str, torch.Tensor]:
        """Buffers computed from the config, never stored in checkpoints."""
        return {"embed_scale": torch.tensor(self._embed_scale)}

    def forward(self, tokens: Int[torch.Tensor, "batch pos"]) -> Float[torch.Tensor, "batch pos d_model"]:
        return nn.functional.embedding(tokens, self.W_E) * self.embed_scale.to(self.W_E.dtype)

    def soft(self, probs: Float[torch.Tensor, "batch pos vocab"]) -> Float[torch.Tensor, "batch pos d_model"]:
        """Expected embedding under a distribution over the vocabulary (self-conditioning's input)."""
        return torch.matmul(probs.to(self.W_E.dtype), self.W_E) * self.embed_scale.to(self.W_E.dtype)


class PlacedByEmbedding:
    """`dtype` and `device` of a model: its token embedding's, the one that takes the input ids. A model
    names the stack holding that embedding in `embedding_stack`."""

    embedding_stack: str

    @property
    def dtype(self) -> torch.dtype:
        """The model's dtype: its token embedding's (`from_pretrained(dtype=...)` gives every weight this one)."""
        return getattr(self, self.embedding_stack).embed.W_E.dtype

    @property
    def device(self) -> torch.device:
        """Where input ids go: the token embedding's device (with a `device_map`, later blocks may sit elsewhere)."""
        return getattr(self, self.embedding_stack).embed.W_E.device
