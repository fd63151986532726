"""Generate with a tiny random DiffusionGemma, record the residual stream at every step, and print
a summary of the trajectory. Runs on a laptop CPU in seconds."""

import torch

from diffusionlens import DiffusionGemmaConfig, HookedDiffusionGemma, ReplayNoise

config = DiffusionGemmaConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    global_head_dim=32,
    num_global_key_value_heads=1,
    layer_types=("sliding_attention", "full_attention", "sliding_attention", "full_attention"),
    sliding_window=8,
    num_experts=8,
    top_k_experts=2,
    moe_intermediate_size=32,
    canvas_length=16,
    max_position_embeddings=1024,
)
model = HookedDiffusionGemma.from_config(config, seed=0)
prompt = torch.randint(3, config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(0))

result, cache = model.generate_with_cache(
    prompt,
    names_filter="decoder.blocks.*.hook_resid_post",
    max_new_tokens=16,
    max_denoising_steps=8,
    noise=ReplayNoise(seed=0),
    progress=False,
)
print("generated tokens:", result.new_tokens()[0].tolist())
print(result.trace.summary())
print(cache)
print(
    "resid_post of the last block, [step, batch, pos, d_model]:", tuple(cache["decoder.blocks.3.hook_resid_post"].shape)
)
lens = cache.step_cache(step=cache.steps(0)[-1])
print("hooks recorded at the last step:", len(lens))
