"""Top-k mixture of experts, run in parallel with the dense MLP in every block."""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import nn

from diffusionlens.components.mlp import activation
from diffusionlens.components.norms import rms_normalize
from diffusionlens.config import DiffusionGemmaConfig
from diffusionlens.hook_points import HookPoint


class MoE(nn.Module):
    """Router on the un-normalised residual, experts on the pre-normalised one (as the reference).

    hook_router_logits: router scores before the softmax `[batch, pos, expert]`;
    hook_expert_weights / hook_expert_indices: the chosen experts and their renormalised, per-expert
    scaled weights `[batch, pos, top_k]`. Replacing the indices re-routes tokens.
    """

    def __init__(self, cfg: DiffusionGemmaConfig) -> None:
        super().__init__()
        d, n_experts = cfg.hidden_size, cfg.num_experts
        self.top_k = cfg.top_k_experts
        self.eps = cfg.rms_norm_eps
        self.router_proj = nn.Linear(d, n_experts, bias=False)
        self.router_scale = nn.Parameter(torch.ones(d))
        self.per_expert_scale = nn.Parameter(torch.ones(n_experts))
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * cfg.moe_intermediate_size, d))
        self.down_proj = nn.Parameter(torch.empty(n_experts, d, cfg.moe_intermediate_size))
        self.act = activation(cfg.hidden_activation)
        self.hook_router_logits = HookPoint()
        self.hook_expert_weights = HookPoint()
        self.hook_expert_indices = HookPoint()

    def route(
        self, resid: Float[torch.Tensor, "batch pos d_model"]
    ) -> tuple[Float[torch.Tensor, "batch pos k"], Int[torch.Tensor, "batch pos k"]]:
        x = rms_normalize(resid, self.eps).type_as(resid)
        x = x * self.router_scale * resid.shape[-1] ** -0.5
        logits = self.hook_router_logits(self.router_proj(x))
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, indices = torch.topk(probs, k=self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights * self.per_expert_scale[indices]
        return self.hook_expert_weights(weights), self.hook_expert_indices(indices)

    def forward(
        self,
        resid: Float[torch.Tensor, "batch pos d_model"],
        expert_input: Float[torch.Tensor, "batch pos d_model"],
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        weights, indices = self.route(resid)
        return self.apply_experts(expert_input, weights, indices)

    def apply_experts(
        self,
        x: Float[torch.Tensor, "batch pos d_model"],
        weights: Float[torch.Tensor, "batch pos k"],
        indices: Int[torch.Tensor, "batch pos k"],
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        flat_x = x.reshape(-1, x.shape[-1])
        flat_idx = indices.reshape(-1)
        flat_w = weights.reshape(-1)
        # Group (token, slot) pairs by expert so each expert runs one matmul over its tokens.
        order = torch.argsort(flat_idx, stable=True)
        counts = torch.bincount(flat_idx, minlength=self.gate_up_proj.shape[0]).tolist()
        token_of_slot = order // indices.shape[-1]
        out = torch.zeros_like(flat_x)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            slots = order[start : start + count]
            tokens = token_of_slot[start : start + count]
            start += count
            gate, up = nn.functional.linear(flat_x[tokens], self.gate_up_proj[expert]).chunk(2, dim=-1)
            y = nn.functional.linear(self.act(gate) * up, self.down_proj[expert])
            out.index_add_(0, tokens, (y * flat_w[slots, None]).to(out.dtype))
        return out.view_as(x)
