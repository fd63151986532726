"""The dense gated-GELU MLP branch (and the same shape of MLP inside self-conditioning)."""

from __future__ import annotations

from functools import partial

import torch
from jaxtyping import Float
from torch import nn

from diffusionlens.hooks.points import HookPoint


def activation(name: str):
    if name in ("gelu_pytorch_tanh", "gelu_tanh"):
        return partial(nn.functional.gelu, approximate="tanh")  # a partial pickles; a lambda does not
    if name == "gelu":
        return nn.functional.gelu
    if name in ("silu", "swish"):
        return nn.functional.silu
    raise ValueError(f"Unsupported hidden_activation {name!r}; use 'gelu_pytorch_tanh', 'gelu' or 'silu'")


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)).

    hook_pre: gate pre-activation; hook_pre_linear: up projection; hook_post: the product fed to down.
    """

    def __init__(self, d_model: int, d_mlp: int, act: str) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_mlp, bias=False)
        self.up_proj = nn.Linear(d_model, d_mlp, bias=False)
        self.down_proj = nn.Linear(d_mlp, d_model, bias=False)
        self.act = activation(act)
        self.hook_pre = HookPoint()
        self.hook_pre_linear = HookPoint()
        self.hook_post = HookPoint()

    def forward(self, x: Float[torch.Tensor, "batch pos d_model"]) -> Float[torch.Tensor, "batch pos d_model"]:
        pre = self.hook_pre(self.gate_proj(x))
        linear = self.hook_pre_linear(self.up_proj(x))
        post = self.hook_post(self.act(pre) * linear)
        return self.down_proj(post)
