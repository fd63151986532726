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
from diffusionlens.hooks.points import HookPoint

#: The block's RMSNorms, in the order it applies them (their checkpoint names: `weights/checkpoint.py`).
NORMS = ("ln1", "ln1_post", "ln2", "ln2_post_mlp", "ln2_moe", "ln2_post_moe", "ln2_post")
#: The norms whose output joins the residual stream; each has a `hook_scale` (1/rms, `[batch, pos, 1]`).
SCALED_NORMS = ("ln1_post", "ln2_post_mlp", "ln2_post_moe", "ln2_post")


class Block(nn.Module):
    def __init__(self, cfg: DiffusionGemmaConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.sliding = cfg.is_sliding(layer)
        d_model, eps = cfg.hidden_size, cfg.rms_norm_eps
        # Declared in the order the block applies them (NORMS), which is also the state_dict order.
        # The four post-norms carry `hook_scale` (SCALED_NORMS): they sit between a sublayer and the
        # residual, so their cached 1/rms makes every attribution through them exact.
        self.ln1 = RMSNorm(d_model, eps)  # attention input
        self.ln1_post = RMSNorm(d_model, eps, scale_hook=True)  # attention output, before it joins the residual
        self.ln2 = RMSNorm(d_model, eps)  # dense MLP input
        self.ln2_post_mlp = RMSNorm(d_model, eps, scale_hook=True)  # dense MLP output
        self.ln2_moe = RMSNorm(d_model, eps)  # expert input (the router reads the raw residual)
        self.ln2_post_moe = RMSNorm(d_model, eps, scale_hook=True)  # MoE output
        self.ln2_post = RMSNorm(d_model, eps, scale_hook=True)  # sum of both branches, before it joins the residual
        self.attn = Attention(cfg, layer)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_activation)
        self.moe = MoE(cfg)
        # The only per-stack weight: encoder and decoder blocks share everything else.
        self.register_buffer("layer_scalar", torch.ones(1))
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model] block input
        self.hook_attn_out = HookPoint()  # [batch, pos, d_model] after ln1_post
        self.hook_resid_mid = HookPoint()  # [batch, pos, d_model] resid_pre + attn_out
        self.hook_mlp_out = HookPoint()  # [batch, pos, d_model] after ln2_post_mlp
        self.hook_moe_out = HookPoint()  # [batch, pos, d_model] after ln2_post_moe
        self.hook_ffn_out = HookPoint()  # [batch, pos, d_model] ln2_post(mlp_out + moe_out)
        self.hook_resid_post = HookPoint()  # [batch, pos, d_model] (resid_mid + ffn_out) * layer_scalar

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
