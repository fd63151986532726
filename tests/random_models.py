"""A random model for the decomposition tests (unit and integration): every tensor randomised, norm gains and
layer scalars around 1 with real spread, so a skipped norm, a missing scalar or a head/expert mix-up shows."""

from __future__ import annotations

import torch

from diffusionlens import DiffusionGemmaConfig, HookedDiffusionGemma

# Sliding and full layers, grouped KV heads, attention biases (an o_proj bias component), top-2 of 3 experts.
CFG = DiffusionGemmaConfig(
    vocab_size=53,
    hidden_size=24,
    intermediate_size=20,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=6,
    global_head_dim=10,
    num_global_key_value_heads=1,
    sliding_window=4,
    layer_types=("sliding_attention", "full_attention", "sliding_attention"),
    num_experts=3,
    top_k_experts=2,
    moe_intermediate_size=7,
    attention_bias=True,
    canvas_length=5,
    max_position_embeddings=64,
)


def random_model(dtype: torch.dtype) -> HookedDiffusionGemma:
    model = HookedDiffusionGemma.from_config(CFG, dtype=dtype)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith(("embed_scale", "inv_freq")):
                continue
            noise = torch.randn(tensor.shape, generator=g, dtype=torch.float64)
            scale_like = "norm" in name or ".ln" in name or "scale" in name or "layer_scalar" in name
            tensor.copy_(1.0 + 0.3 * noise if scale_like else 0.3 * noise)
    return model
