"""Self-conditioning: the previous step's logits re-enter the decoder as a soft embedding."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import nn

from diffusionlens.components.embed import Embed
from diffusionlens.components.mlp import GatedMLP
from diffusionlens.components.norms import RMSNorm
from diffusionlens.config import DiffusionGemmaConfig
from diffusionlens.hooks.points import HookPoint


class SelfConditioning(nn.Module):
    """post_norm(embed(canvas) + MLP(pre_norm(softmax(logits_in) @ E × √d))).

    hook_logits_in fires only when logits are given (not at step 0); hook_soft_embed is zeros at
    step 0; hook_out is the gated MLP's output before it is added to the token embedding.
    """

    def __init__(self, cfg: DiffusionGemmaConfig) -> None:
        super().__init__()
        self.pre_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_activation)
        # Its output is block 0's input: hook_scale lets the embedding and the self-conditioning signal
        # be told apart in the residual.
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, with_scale=False, scale_hook=True)
        self.hook_logits_in = HookPoint()
        self.hook_soft_embed = HookPoint()
        self.hook_out = HookPoint()

    def forward(
        self,
        token_embed: Float[torch.Tensor, "batch pos d_model"],
        logits_in: Float[torch.Tensor, "batch pos vocab"] | None,
        embed: Embed,
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        if logits_in is None:
            soft = torch.zeros_like(token_embed)
        else:
            probs = torch.softmax(self.hook_logits_in(logits_in), dim=-1, dtype=torch.float32)
            soft = embed.soft(probs).to(token_embed.dtype)
        soft = self.hook_soft_embed(soft)
        signal = self.hook_out(self.mlp(self.pre_norm(soft)))
        return self.post_norm(token_embed + signal)
