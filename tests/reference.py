"""Builders for tiny random transformers DiffusionGemma models, the ground truth of our tests."""

from __future__ import annotations

import torch
from transformers import DiffusionGemmaConfig as HFConfig
from transformers import DiffusionGemmaForBlockDiffusion
from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

from diffusionlens import HookedDiffusionGemma

TINY_VISION = dict(
    model_type="gemma4_vision",
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=8,
)

# Two configs: a non-default sliding/full pattern, 1 vs >1 key-value heads, top-1 vs top-k experts.
CONFIGS = {
    "mixed": dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        global_head_dim=16,
        num_global_key_value_heads=1,
        sliding_window=6,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=12,
        max_position_embeddings=512,
    ),
    "single_kv": dict(
        vocab_size=61,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=5,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=12,
        global_head_dim=8,
        num_global_key_value_heads=2,
        sliding_window=4,
        layer_types=[
            "full_attention",
            "sliding_attention",
            "sliding_attention",
            "full_attention",
            "full_attention",
        ],
        num_experts=3,
        top_k_experts=1,
        moe_intermediate_size=8,
        max_position_embeddings=256,
    ),
}
CANVAS = {"mixed": 8, "single_kv": 6}


def build_reference(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> DiffusionGemmaForBlockDiffusion:
    """A transformers DiffusionGemma with every floating tensor of its state dict randomised.

    Norm weights and `layer_scalar`s get values around 1 with real spread so that a swapped or
    skipped norm shows; config-derived buffers (embed_scale, RoPE frequencies) stay as built.
    """
    torch.manual_seed(seed)
    cfg = HFConfig(text_config=dict(CONFIGS[name]), vision_config=dict(TINY_VISION), canvas_length=CANVAS[name])
    model = DiffusionGemmaForBlockDiffusion(cfg).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    derived = ("embed_scale", "inv_freq")
    with torch.no_grad():
        for name_, tensor in model.state_dict(keep_vars=True).items():
            if not tensor.is_floating_point() or name_.endswith(derived):
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if "norm" in name_ or "layer_scalar" in name_ or name_.endswith("scale"):
                tensor.copy_(1.0 + 0.3 * noise)
            else:
                tensor.copy_(0.2 * noise)
    frequencies = {n: b.clone() for n, b in model.named_buffers() if n.endswith("inv_freq")}
    model.to(dtype)
    # As from_pretrained(dtype=bf16) leaves them: RoPE frequencies stay float32 in a 16-bit model.
    for name_, value in frequencies.items():
        module_name, _, attribute = name_.rpartition(".")
        model.get_submodule(module_name)._buffers[attribute] = value
    return model


def build_pair(name: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    reference = build_reference(name, seed, dtype)
    ours = HookedDiffusionGemma.from_pretrained(reference)
    return reference, ours


def reference_generate(reference: DiffusionGemmaForBlockDiffusion, ids: torch.Tensor, **kw):
    """transformers' `generate` called with our keyword names: its entropy bound lives in a sampler config."""
    kw["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=float(kw.pop("entropy_bound")))
    return reference.generate(ids, **kw)
