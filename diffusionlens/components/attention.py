"""Grouped-query attention with q/k/v norms, RoPE and (on full layers) shared keys and values.

The encoder and the decoder run the same module: the encoder's keys are the prompt seen so far
(causal, windowed on sliding layers); the decoder's keys are the cached prompt followed by the
canvas, all visible. Which keys are visible arrives as a boolean mask built by the caller (True = may
attend), or None where SDPA's `is_causal` (or nothing at all) says it all.
"""

from __future__ import annotations

import torch
from einops import rearrange
from jaxtyping import Bool, Float
from torch import nn
from torch.nn import functional as F

from diffusionlens.components.norms import RMSNorm
from diffusionlens.components.rope import apply_rotary
from diffusionlens.config import DiffusionGemmaConfig
from diffusionlens.hooks.points import HookPoint


class Attention(nn.Module):
    """Hooks: q/k/v after their norms and before RoPE `[batch, pos, head, d_head]`; rot_q/rot_k after
    RoPE; attn_scores (masked, pre-softmax) and pattern `[batch, head, query, key]`; z per head.

    hook_result `[batch, pos, head, d_model]`: each head's output through its slice of o_proj (without
    the o_proj bias), before the post-attention norm. It costs `head × d_model` per position, so it
    fires only while `use_attn_result` is True (`model.set_use_attn_result(True)`, as TransformerLens).
    """

    #: Compute and fire hook_result (per-head outputs). Off by default: it costs memory and a matmul.
    use_attn_result: bool = False

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
        self.hook_q = HookPoint()  # [batch, pos, head, d_head] after q_norm, before RoPE
        self.hook_k = HookPoint()  # [batch, pos, kv_head, d_head] after k_norm, before RoPE
        self.hook_v = HookPoint()  # [batch, pos, kv_head, d_head] after v_norm
        self.hook_rot_q = HookPoint()  # [batch, pos, head, d_head]
        self.hook_rot_k = HookPoint()  # [batch, pos, kv_head, d_head]
        self.hook_attn_scores = HookPoint()  # [batch, head, query, key] masked, before the softmax
        self.hook_pattern = HookPoint()  # [batch, head, query, key]
        self.hook_z = HookPoint()  # [batch, pos, head, d_head] per-head output, before o_proj
        self.hook_result = HookPoint()  # [batch, pos, head, d_model] per head through o_proj (opt-in)

    def forward(
        self,
        x: Float[torch.Tensor, "batch pos d_model"],
        cos: Float[torch.Tensor, "#batch pos d_head"],
        sin: Float[torch.Tensor, "#batch pos d_head"],
        past_k: Float[torch.Tensor, "batch kv_head past d_head"] | None,
        past_v: Float[torch.Tensor, "batch kv_head past d_head"] | None,
        mask: Bool[torch.Tensor, "batch 1 pos key"] | None,
        causal: bool,
    ) -> tuple[
        Float[torch.Tensor, "batch pos d_model"],
        Float[torch.Tensor, "batch kv_head pos d_head"],
        Float[torch.Tensor, "batch kv_head pos d_head"],
    ]:
        """Attention output plus this call's rotated keys and values (for the prompt cache).

        `mask` (True = may attend) is None when nothing needs masking beyond `causal`.
        """
        q = self.q_proj(x).unflatten(-1, (self.n_heads, self.d_head))
        k_raw = self.k_proj(x).unflatten(-1, (self.n_kv_heads, self.d_head))
        v_raw = k_raw if self.v_proj is None else self.v_proj(x).unflatten(-1, (self.n_kv_heads, self.d_head))
        q = self.hook_q(self.q_norm(q))
        k = self.hook_k(self.k_norm(k_raw))
        v = self.hook_v(self.v_norm(v_raw))
        q = self.hook_rot_q(apply_rotary(q, cos, sin))
        k = self.hook_rot_k(apply_rotary(k, cos, sin))

        new_k = rearrange(k, "b p h d -> b h p d")
        new_v = rearrange(v, "b p h d -> b h p d")
        keys = new_k if past_k is None else torch.cat((past_k, new_k), dim=2)
        values = new_v if past_v is None else torch.cat((past_v, new_v), dim=2)
        queries = rearrange(q, "b p h d -> b h p d")
        causal = causal and mask is None and queries.shape[2] > 1
        z = self._fused(queries, keys, values, mask, causal)
        if self.hook_attn_scores.active or self.hook_pattern.active:
            z = self._explicit(queries, keys, values, mask, causal, z)
        z = self.hook_z(rearrange(z, "b h p d -> b p h d"))
        out = self.o_proj(z.flatten(-2))
        if self.use_attn_result:
            out = self._per_head_results(z, out)
        return out, new_k, new_v

    @property
    def W_O(self) -> Float[torch.Tensor, "head d_head d_model"]:
        """o_proj's weight split per head, in TransformerLens' layout."""
        return rearrange(self.o_proj.weight, "m (h d) -> h d m", h=self.n_heads)

    def _per_head_results(
        self, z: Float[torch.Tensor, "batch pos head d_head"], fused: Float[torch.Tensor, "batch pos d_model"]
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        """Fire hook_result. The fused o_proj output is kept unless a hook replaced the per-head
        results: summing heads reorders the reduction, and read-only hooks must not move a bit."""
        result = torch.einsum("bphd,hdm->bphm", z, self.W_O)
        hooked = self.hook_result(result)
        if hooked is result:
            return fused
        out = hooked.sum(dim=2)
        return out if self.o_proj.bias is None else out + self.o_proj.bias

    def _repeat(self, kv: torch.Tensor) -> torch.Tensor:
        group = self.n_heads // self.n_kv_heads
        if group == 1:
            return kv
        # expand + reshape, as transformers' repeat_kv: with one key-value head the result is a
        # stride-0 view, where repeat_interleave always copies the keys and values.
        batch, n_kv, n_pos, d_head = kv.shape
        return kv[:, :, None].expand(batch, n_kv, group, n_pos, d_head).reshape(batch, n_kv * group, n_pos, d_head)

    def _fused(self, queries, keys, values, mask, causal: bool) -> torch.Tensor:
        # The same scaled_dot_product_attention call, GQA handling and mask form as transformers'
        # sdpa path, so the result is bit-identical and generation reproduces its tokens.
        # q and k are RMS-normalised per head, hence a softmax scale of 1.
        if mask is None and self.n_heads != self.n_kv_heads and self.d_head <= 256:
            return F.scaled_dot_product_attention(queries, keys, values, scale=1.0, is_causal=causal, enable_gqa=True)
        keys, values = self._repeat(keys), self._repeat(values)
        return F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=1.0, is_causal=causal)

    def _explicit(self, queries, keys, values, mask, causal: bool, fused_z: torch.Tensor) -> torch.Tensor:
        """Materialise scores and pattern for their hooks. The fused result is kept unless a hook
        replaced one of them, so read-only hooks leave the output bit-identical."""
        scores = torch.matmul(queries, self._repeat(keys).transpose(2, 3))
        allowed = mask
        if causal:
            n_q, n_k = scores.shape[-2:]
            allowed = torch.ones(n_q, n_k, dtype=torch.bool, device=scores.device).tril(diagonal=n_k - n_q)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        hooked_scores = self.hook_attn_scores(scores)
        pattern = torch.softmax(hooked_scores, dim=-1, dtype=torch.float32).to(queries.dtype)
        hooked_pattern = self.hook_pattern(pattern)
        if hooked_scores is scores and hooked_pattern is pattern:
            return fused_z
        return torch.matmul(hooked_pattern, self._repeat(values))
