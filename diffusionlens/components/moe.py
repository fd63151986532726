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

    `gather_experts` (default False) picks how the chosen experts run; both compute the same numbers:
    False sorts the (token, slot) pairs by expert and runs one grouped matmul, transformers' default
    path (fast, and bit-identical to it). True gathers each token's k expert weight slices by index
    and applies them with batched matmuls: the *routed* form, whose graph has no sort, histogram or
    per-expert offsets, only the work each token does. `serial_depth` traces that form (a gather is
    data movement; the grouped path's sort and histogram would charge bookkeeping no token waits on).
    It materialises `[batch, pos, k, 2·d_moe, d_model]` weight slices, so keep it for tracing and
    small models.
    """

    gather_experts: bool = False

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
        if self.gather_experts:
            return self.apply_experts_gathered(expert_input, weights, indices)
        return self.apply_experts(expert_input, weights, indices)

    def apply_experts_gathered(
        self,
        x: Float[torch.Tensor, "batch pos d_model"],
        weights: Float[torch.Tensor, "batch pos k"],
        indices: Int[torch.Tensor, "batch pos k"],
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        """Routed form: each token gathers its k experts' weights and applies them with a batched matmul.

        The same numbers as `apply_experts` (cast to the weights' dtype, fp32 mixing weights, sum over
        the k slots, cast back), with a graph that holds only the per-token work.
        """
        x_in = x.to(self.gate_up_proj.dtype)
        # [b, p, k, 2·d_moe, d] @ [b, p, 1, d, 1]: contraction over d_model.
        gate_up = torch.matmul(self.gate_up_proj[indices], x_in[..., None, :, None]).squeeze(-1)
        gate, up = gate_up.chunk(2, dim=-1)
        # [b, p, k, d, d_moe] @ [b, p, k, d_moe, 1]: contraction over d_moe.
        out = torch.matmul(self.down_proj[indices], (self.act(gate) * up)[..., None]).squeeze(-1)
        out = out * weights.unsqueeze(-1)
        return out.sum(dim=-2).to(x.dtype)

    def apply_experts(
        self,
        x: Float[torch.Tensor, "batch pos d_model"],
        weights: Float[torch.Tensor, "batch pos k"],
        indices: Int[torch.Tensor, "batch pos k"],
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        """Run each (token, slot) through its expert with one grouped matmul, as transformers'
        default `grouped_mm` experts path does (same sort, offsets and sum order)."""
        flat_x = x.reshape(-1, x.shape[-1])
        n_tokens, top_k = flat_x.shape[0], indices.shape[-1]
        expert_ids, perm = torch.sort(indices.reshape(-1))
        grouped_x = flat_x[perm // top_k]
        grouped_w = weights.reshape(-1)[perm]
        n_experts = self.gate_up_proj.shape[0]
        counts_input = expert_ids.float() if x.device.type in ("cpu", "mps") else expert_ids.int()
        offsets = torch.cumsum(
            torch.histc(counts_input, bins=n_experts, min=0, max=n_experts - 1), 0, dtype=torch.int32
        )
        gate, up = _grouped_linear(grouped_x, self.gate_up_proj, offsets).chunk(2, dim=-1)
        out = _grouped_linear(self.act(gate) * up, self.down_proj, offsets)
        out = out * grouped_w.unsqueeze(-1)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        out = out[inverse].view(n_tokens, top_k, -1).sum(dim=1)
        return out.to(x.dtype).view_as(x)


def _grouped_mm_available(weight: torch.Tensor) -> bool:
    if not hasattr(torch.nn.functional, "grouped_mm"):
        return False
    if weight.device.type == "cuda":
        return torch.cuda.get_device_capability(weight.device) >= (8, 0)
    return True


def _grouped_linear(
    x: Float[torch.Tensor, "slots d_in"],
    weight: Float[torch.Tensor, "expert d_out d_in"],
    offsets: Int[torch.Tensor, " expert"],
) -> Float[torch.Tensor, "slots d_out"]:
    """Rows of `x` sorted by expert, each multiplied by its expert's weight."""
    if _grouped_mm_available(weight):
        return torch.nn.functional.grouped_mm(x.to(weight.dtype), weight.transpose(-2, -1), offs=offsets)
    # GPUs older than sm80 have no grouped-matmul kernel: one matmul per expert that has rows.
    out = x.new_empty(x.shape[0], weight.shape[1])
    start = 0
    for expert, end in enumerate(offsets.tolist()):
        if end > start:
            out[start:end] = x[start:end] @ weight[expert].T
        start = end
    return out
