"""One DiffusionGemma block: attention, then a dense MLP and a MoE in parallel, then a layer scalar."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import nn

from diffusionlens.components.attention import Attention
from diffusionlens.components.mlp import GatedMLP
from diffusionlens.components.moe import MoE
from diffusionlens.components.norms import RMSNorm
from diffusionlens.config import DiffusionGemmaConfig
from diffusionlens.hook_points import HookPoint

# Our norm names → transformers' names, in the order the block applies them.
NORM_NAMES = {
    "ln1": "input_layernorm",
    "ln1_post": "post_attention_layernorm",
    "ln2": "pre_feedforward_layernorm",
    "ln2_post_mlp": "post_feedforward_layernorm_1",
    "ln2_moe": "pre_feedforward_layernorm_2",
    "ln2_post_moe": "post_feedforward_layernorm_2",
    "ln2_post": "post_feedforward_layernorm",
}


class Block(nn.Module):
    def __init__(self, cfg: DiffusionGemmaConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.sliding = cfg.is_sliding(layer)
        for name in NORM_NAMES:
            setattr(self, name, RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))
        self.attn = Attention(cfg, layer)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_activation)
        self.moe = MoE(cfg)
        # The only per-stack weight: encoder and decoder blocks share everything else.
        self.register_buffer("layer_scalar", torch.ones(1))
        for name in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "moe_out", "ffn_out", "resid_post"):
            setattr(self, f"hook_{name}", HookPoint())

    def forward(
        self,
        resid: Float[torch.Tensor, "batch pos d_model"],
        cos: torch.Tensor,
        sin: torch.Tensor,
        past_k: torch.Tensor | None,
        past_v: torch.Tensor | None,
        mask: torch.Tensor | None,
        causal: bool,
    ) -> tuple[Float[torch.Tensor, "batch pos d_model"], torch.Tensor, torch.Tensor]:
        resid = self.hook_resid_pre(resid)
        attn, new_k, new_v = self.attn(self.ln1(resid), cos, sin, past_k, past_v, mask, causal)
        resid = self.hook_resid_mid(resid + self.hook_attn_out(self.ln1_post(attn)))
        mlp_out = self.hook_mlp_out(self.ln2_post_mlp(self.mlp(self.ln2(resid))))
        moe_out = self.hook_moe_out(self.ln2_post_moe(self.moe(resid, self.ln2_moe(resid))))
        ffn_out = self.hook_ffn_out(self.ln2_post(mlp_out + moe_out))
        resid = self.hook_resid_post((resid + ffn_out) * self.layer_scalar)
        return resid, new_k, new_v
