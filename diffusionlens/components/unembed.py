"""Tied LM head with tanh soft-capping in fp32."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import nn


def unembed(
    resid: Float[torch.Tensor, "*batch d_model"], W_E: Float[torch.Tensor, "vocab d_model"], softcap: float | None
) -> Float[torch.Tensor, "*batch vocab"]:
    logits = nn.functional.linear(resid, W_E).float()
    return torch.tanh(logits / softcap) * softcap
