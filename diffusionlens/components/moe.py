"""Top-k mixture of experts, run in parallel with the dense MLP in every block."""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import nn

from diffusionlens.components.mlp import activation
from diffusionlens.components.norms import rms_normalize
from diffusionlens.config import DiffusionGemmaConfig
from diffusionlens.hooks.points import HookPoint

# The shapes of the experts' interface, which route() and both ways of running the experts share.
Hidden = Float[torch.Tensor, "batch pos d_model"]
SlotWeights = Float[torch.Tensor, "batch pos k"]  # each token's k routing weights
SlotExperts = Int[torch.Tensor, "batch pos k"]  # the expert in each of a token's k slots
SlotOutputs = Float[torch.Tensor, "batch pos k d_model"]  # each slot's weighted expert output


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

    hook_expert_out `[batch, pos, top_k, d_model]`: each chosen expert's output times its routing
    weight, slot for slot as hook_expert_indices, before the MoE post-norm (their sum over slots,
    cast to the model dtype, is the MoE output). It costs `top_k × d_model` per position, so it fires
    only while `use_expert_outputs` is True (`model.set_use_expert_outputs(True)`).
    """

    gather_experts: bool = False
    #: Fire hook_expert_out (per-expert outputs). Off by default: it costs memory.
    use_expert_outputs: bool = False

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
        self.hook_expert_out = HookPoint()  # [batch, pos, top_k, d_model] weighted, per slot (opt-in)

    def route(self, resid: Hidden) -> tuple[SlotWeights, SlotExperts]:
        x = rms_normalize(resid, self.eps).type_as(resid)
        x = x * self.router_scale * resid.shape[-1] ** -0.5
        logits = self.hook_router_logits(self.router_proj(x))
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, indices = torch.topk(probs, k=self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights * self.per_expert_scale[indices]
        return self.hook_expert_weights(weights), self.hook_expert_indices(indices)

    def forward(self, resid: Hidden, expert_input: Hidden) -> Hidden:
        weights, indices = self.route(resid)
        run = self.apply_experts_gathered if self.gather_experts else self.apply_experts
        if not self.use_expert_outputs:
            return run(expert_input, weights, indices)
        fused, per_slot = run(expert_input, weights, indices, per_slot=True)
        hooked = self.hook_expert_out(per_slot)
        # Unless a hook replaced them, the output is the fused sum: bit-identical to the default path.
        return fused if hooked is per_slot else hooked.sum(dim=-2).to(expert_input.dtype)

    def apply_experts_gathered(
        self, x: Hidden, weights: SlotWeights, indices: SlotExperts, per_slot: bool = False
    ) -> Hidden | tuple[Hidden, SlotOutputs]:
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
        fused = out.sum(dim=-2).to(x.dtype)
        return (fused, out) if per_slot else fused

    def apply_experts(
        self, x: Hidden, weights: SlotWeights, indices: SlotExperts, per_slot: bool = False
    ) -> Hidden | tuple[Hidden, SlotOutputs]:
        """Run each (token, slot) through its expert with one grouped matmul, as transformers'
        default `grouped_mm` experts path does (same sort, offsets and sum order).

        With `per_slot`, also the weighted output of every (token, slot) before the sum over slots."""
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
        slots = out[inverse].view(n_tokens, top_k, -1)
        fused = slots.sum(dim=1).to(x.dtype).view_as(x)
        return (fused, slots.view(*x.shape[:-1], top_k, -1)) if per_slot else fused


#: Dtypes torch's grouped_mm has kernels for (it refuses float64, e.g. on CPU).
GROUPED_MM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _grouped_mm_available(weight: torch.Tensor) -> bool:
    if not hasattr(torch.nn.functional, "grouped_mm") or weight.dtype not in GROUPED_MM_DTYPES:
        return False
    # Its kernels also need every row stride (d_in, d_out) to be a multiple of 16 bytes.
    if any(dim * weight.element_size() % 16 for dim in weight.shape[-2:]):
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
    # No grouped-matmul kernel (GPUs older than sm80, float64, unaligned sizes): one matmul per expert.
    out = x.new_empty(x.shape[0], weight.shape[1])
    start = 0
    for expert, end in enumerate(offsets.tolist()):
        if end > start:
            out[start:end] = x[start:end] @ weight[expert].T
        start = end
    return out
