"""Full width on CPU: a two-layer slice of the real 26B-A4B config (hidden 2816, vocab 262144, 128
experts top-8, local head_dim 256 × 8 KV heads, global head_dim 512 × 2 KV heads, soft-cap 30),
every tensor random, against transformers.

The tiny configs of the other tests cannot catch what only appears at full width: a head_dim that
differs per layer type, top-8 of 128 experts, the real vocabulary through the soft-cap. The slice
holds ~2.3B float32 parameters (~9.3 GB); one copy is alive at a time (ours aliases transformers'
tensors, and the models loaded from disk are built one after the other), so the peak stays near
10 GB (measured: 10.9 GB peak RSS). Runtime: 238 s of CPU time (2 cores; 12 minutes of wall time on a
machine shared with other jobs), most of it filling, writing and reading the weights.

Deselect with `pytest -m "not full_width"` on a small machine.
"""

from __future__ import annotations

import gc

import pytest
import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from reference import TINY_VISION, reference_generate
from transformers import DiffusionGemmaConfig as HFConfig
from transformers import DiffusionGemmaForBlockDiffusion

from diffusionlens import HookedDiffusionGemma
from diffusionlens.weights.checkpoint import canonical_name

pytestmark = pytest.mark.full_width

# The real config's values, two layers: one sliding and one full-attention layer.
FULL_WIDTH_TWO_LAYERS = dict(
    vocab_size=262144,
    hidden_size=2816,
    intermediate_size=2112,
    num_hidden_layers=2,
    layer_types=["sliding_attention", "full_attention"],
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=256,
    global_head_dim=512,
    num_global_key_value_heads=2,
    num_experts=128,
    top_k_experts=8,
    moe_intermediate_size=704,
    sliding_window=1024,
    rms_norm_eps=1e-6,
    final_logit_softcapping=30.0,
    hidden_activation="gelu_pytorch_tanh",
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
    },
    max_position_embeddings=4096,
)
CANVAS_LENGTH = 8  # small: the cost of a pass is the 2.3B weights, not the canvas
DERIVED_BUFFERS = ("embed_scale", "inv_freq")  # computed from the config; must keep their built values
GENERATION = dict(
    max_new_tokens=2 * CANVAS_LENGTH,
    max_denoising_steps=4,
    entropy_bound=0.4,
    stability_threshold=0,  # a random model never holds its argmax canvas still
    confidence_threshold=1e-6,
    pad_token_id=0,
    eos_token_id=None,
)


def build_random_full_width_reference(
    seed: int = 0,
    text_config: dict | None = None,
    canvas_length: int = CANVAS_LENGTH,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> DiffusionGemmaForBlockDiffusion:
    """transformers' model with parameters created on the meta device, then materialised on `device`
    one tensor at a time from a seeded generator (no default init pass over billions of parameters).
    Also used by benchmarks/gpu_checks.py for the full 30-layer config on a GPU."""
    text_config = dict(text_config or FULL_WIDTH_TWO_LAYERS)
    cfg = HFConfig(text_config=text_config, vision_config=dict(TINY_VISION), canvas_length=canvas_length)
    with init_empty_weights(include_buffers=False):  # buffers stay real: RoPE tables are built normally
        model = DiffusionGemmaForBlockDiffusion(cfg)
    generator = torch.Generator(device=device).manual_seed(seed)

    def random_like(name: str, shape: torch.Size) -> torch.Tensor:
        noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)
        # Norm weights and scalars around 1 with spread, so a skipped or swapped norm shows; matrices
        # small enough that 2816-wide sums stay below the soft-cap.
        if "norm" in name or "layer_scalar" in name or name.endswith("scale"):
            return 1.0 + 0.1 * noise
        return 0.02 * noise

    with torch.no_grad():
        # The encoder's text weights and the LM head are the decoder's in the checkpoint (transformers
        # ties them after loading): fill each decoder tensor once and give its aliases the same tensor.
        filled: dict[str, torch.Tensor] = {}
        for name, param in list(model.named_parameters(remove_duplicate=False)):
            owner = canonical_name(name) or "model.decoder.embed_tokens.weight"
            if owner not in filled:
                filled[owner] = random_like(owner, param.shape)
            set_module_tensor_to_device(model, name, device, value=filled[owner], dtype=dtype)
        del filled
    model.to(device)  # the (small) buffers that were built on CPU
    with torch.no_grad():
        # Stored buffers (`layer_scalar`) take `dtype` as they would loading a checkpoint in it; a float32
        # scalar would turn a bf16 residual into float32 halfway through the stack.
        for name, buffer in list(model.named_buffers()):
            if buffer.is_floating_point() and not name.endswith(DERIVED_BUFFERS):
                module_name, _, attribute = name.rpartition(".")
                model.get_submodule(module_name)._buffers[attribute] = random_like(name, buffer.shape)
    model.tie_weights()
    assert not any(p.is_meta for p in model.parameters())
    assert {p.dtype for p in model.parameters()} == {dtype}, "meta parameters are float32; values keep `dtype`"
    encoder_gate_up = model.model.encoder.language_model.layers[0].experts.gate_up_proj
    assert encoder_gate_up.data_ptr() == model.model.decoder.layers[0].experts.gate_up_proj.data_ptr()
    return model.eval()


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    vocab = FULL_WIDTH_TWO_LAYERS["vocab_size"]
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, vocab, (2, 7), generator=generator)
    canvas = torch.randint(0, vocab, (2, CANVAS_LENGTH), generator=generator)
    self_cond = 3.0 * torch.randn(2, CANVAS_LENGTH, vocab, generator=generator)
    return prompt, canvas, self_cond


def transformers_outputs(reference: DiffusionGemmaForBlockDiffusion) -> tuple[torch.Tensor, torch.Tensor]:
    prompt, canvas, self_cond = inputs()
    with torch.no_grad():
        logits = reference(input_ids=prompt, decoder_input_ids=canvas, self_conditioning_logits=self_cond).logits
    torch.manual_seed(5)
    tokens = reference_generate(reference, prompt, **GENERATION).sequences
    return logits, tokens


def our_outputs(model: HookedDiffusionGemma) -> tuple[torch.Tensor, torch.Tensor]:
    prompt, canvas, self_cond = inputs()
    with torch.no_grad():
        logits = model(prompt, canvas, self_cond)
    torch.manual_seed(5)
    tokens = model.generate(prompt, progress=False, **GENERATION).sequences
    return logits, tokens


def release(*objects) -> None:
    del objects
    gc.collect()


def test_full_width_slice_matches_transformers_in_memory_and_from_sharded_checkpoint(tmp_path):
    reference = build_random_full_width_reference()
    ours = HookedDiffusionGemma.from_pretrained(reference, progress=False)
    assert ours.cfg.head_dim == 256 and ours.cfg.global_head_dim == 512 and ours.cfg.num_experts == 128
    assert ours.decoder.embed.W_E.data_ptr() == reference.get_input_embeddings().weight.data_ptr(), "copied weights"

    expected_logits, expected_tokens = transformers_outputs(reference)
    logits, tokens = our_outputs(ours)
    assert logits.dtype == torch.float32 and logits.shape == (2, CANVAS_LENGTH, FULL_WIDTH_TWO_LAYERS["vocab_size"])
    assert logits.abs().max() < 30.0 and logits.std() > 0.1, "soft-cap saturated: the comparison lost its power"
    assert torch.equal(logits, expected_logits)
    assert torch.equal(tokens, expected_tokens)
    assert len(set(tokens[0, 7:].tolist())) > 1, "generation wrote a constant canvas: the test lost its power"

    ours.save_pretrained(tmp_path, max_shard_size="2GB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) >= 4
    del ours, reference
    release()

    # From disk, one model at a time. Tensors read from a file may be unaligned, which changes how
    # CPU grouped_mm rounds (see tests/against_transformers/test_loading.py), so disk is compared with disk.
    from_disk_reference = DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path, dtype=torch.float32).eval()
    disk_logits, disk_tokens = transformers_outputs(from_disk_reference)
    del from_disk_reference
    release()
    assert (disk_logits - expected_logits).abs().max() <= 1e-4

    from_disk = HookedDiffusionGemma.from_pretrained(tmp_path, progress=False)
    ours_disk_logits, ours_disk_tokens = our_outputs(from_disk)
    assert torch.equal(ours_disk_logits, disk_logits)
    assert torch.equal(ours_disk_tokens, disk_tokens)
