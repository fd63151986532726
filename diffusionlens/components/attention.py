"""Grouped-query attention with q/k/v norms, RoPE and (on full layers) shared keys and values.

The encoder and the decoder run the same module: the encoder's keys are the prompt seen so far
(causal, windowed on sliding layers); the decoder's keys are the cached prompt followed by the
canvas, all visible. Which keys are visible arrives as an additive mask built by the caller.
"""

from __future__ import annotations

import torch
from einops import rearrange
from jaxtyping import Float
from torch import nn

from diffusionlens.components.norms import RMSNorm
from diffusionlens.components.rope import apply_rotary
from diffusionlens.config import DiffusionGemmaConfig
from diffusionlens.hook_points import HookPoint


class Attention(nn.Module):
    """Hooks: q/k/v after their norms and before RoPE `[batch, pos, head, d_head]`; rot_q/rot_k after
    RoPE; attn_scores (masked, pre-softmax) and pattern `[batch, head, query, key]`; z per head."""

    def __init__(self, cfg: DiffusionGemmaConfig, layer: int) -> None:
        super().__init__()
        self.sliding = cfg.is_sliding(layer)
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.layer_kv_heads(layer)
        self.d_head = cfg.layer_head_dim(layer)
        d_model, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(d_model, self.n_heads * self.d_head, bias=bias)
        self.k_proj = nn.Linear(d_model, self.n_kv_heads * self.d_head, bias=bias)
        # Full-attention layers have no value projection: values are the (unrotated) key projection.
        self.v_proj = nn.Linear(d_model, self.n_kv_heads * self.d_head, bias=bias) if self.sliding else None
        self.o_proj = nn.Linear(self.n_heads * self.d_head, d_model, bias=bias)
        self.q_norm = RMSNorm(self.d_head, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.d_head, cfg.rms_norm_eps)
        self.v_norm = RMSNorm(self.d_head, cfg.rms_norm_eps, with_scale=False)
        for name in ("q", "k", "v", "rot_q", "rot_k", "attn_scores", "pattern", "z"):
            setattr(self, f"hook_{name}", HookPoint())

    def forward(
        self,
        x: Float[torch.Tensor, "batch pos d_model"],
        cos: Float[torch.Tensor, "batch pos d_head"],
        sin: Float[torch.Tensor, "batch pos d_head"],
        past_k: Float[torch.Tensor, "batch kv_head past d_head"] | None,
        past_v: Float[torch.Tensor, "batch kv_head past d_head"] | None,
        mask: Float[torch.Tensor, "batch 1 pos key"] | None,
    ) -> tuple[
        Float[torch.Tensor, "batch pos d_model"],
        Float[torch.Tensor, "batch kv_head pos d_head"],
        Float[torch.Tensor, "batch kv_head pos d_head"],
    ]:
        """Returns the attention output and this call's rotated keys and values (for the prompt cache)."""
        q = self.q_proj(x).unflatten(-1, (self.n_heads, self.d_head))
        k_raw = self.k_proj(x).unflatten(-1, (self.n_kv_heads, self.d_head))
        v_raw = self.v_proj(x).unflatten(-1, (self.n_kv_heads, self.d_head)) if self.v_proj is not None else k_raw
        q = self.hook_q(self.q_norm(q))
        k = self.hook_k(self.k_norm(k_raw))
        v = self.hook_v(self.v_norm(v_raw))
        q = self.hook_rot_q(apply_rotary(q, cos, sin))
        k = self.hook_rot_k(apply_rotary(k, cos, sin))

        new_k = rearrange(k, "b p h d -> b h p d")
        new_v = rearrange(v, "b p h d -> b h p d")
        keys = new_k if past_k is None else torch.cat((past_k, new_k), dim=2)
        values = new_v if past_v is None else torch.cat((past_v, new_v), dim=2)
        group = self.n_heads // self.n_kv_heads
        if group > 1:
            keys = keys.repeat_interleave(group, dim=1)
            values = values.repeat_interleave(group, dim=1)

        # q and k are RMS-normalised per head, so the reference uses a softmax scale of 1.
        scores = torch.matmul(rearrange(q, "b p h d -> b h p d"), keys.transpose(2, 3))
        if mask is not None:
            scores = scores + mask
        scores = self.hook_attn_scores(scores)
        pattern = self.hook_pattern(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype))
        z = self.hook_z(rearrange(torch.matmul(pattern, values), "b h p d -> b p h d"))
        return self.o_proj(z.flatten(-2)), new_k, new_v
