"""bfloat16 on CPU, on tiny configs: ours equals transformers' DiffusionGemma loaded in bf16, whether ours
was built from the reference, from a config with `dtype=`, or cast with `.to(torch.bfloat16)`; RoPE
frequencies stay float32 in every case, as transformers keeps them (bf16 frequencies move every angle)."""

from __future__ import annotations

import pytest
import torch
from op_counts import count_copies, count_generation
from reference import CANVAS, CONFIGS, build_pair, reference_generate
from transformers import DiffusionGemmaForBlockDiffusion

from diffusionlens import HookedDiffusionGemma

NAME = "single_kv"  # tiny expert sizes a multiple of 8: transformers' bf16 grouped matmul accepts them


def _inputs(vocab: int, canvas: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (2, 6), generator=g), torch.randint(0, vocab, (2, canvas), generator=g)


def _frequency_dtypes(model: torch.nn.Module) -> set[torch.dtype]:
    return {b.dtype for n, b in model.named_buffers() if n.endswith("inv_freq")}


def test_from_reference_in_bf16_is_bit_identical():
    reference, ours = build_pair(NAME, seed=2, dtype=torch.bfloat16)
    assert ours.decoder.blocks[0].attn.q_proj.weight.dtype == torch.bfloat16
    assert _frequency_dtypes(ours) == _frequency_dtypes(reference) == {torch.float32}
    ids, canvas = _inputs(CONFIGS[NAME]["vocab_size"], CANVAS[NAME])
    with torch.no_grad():
        assert torch.equal(ours(ids, canvas), reference(input_ids=ids, decoder_input_ids=canvas).logits)


@pytest.mark.parametrize("build", ["from_config", "cast"])
def test_bf16_models_built_or_cast_match_a_bf16_checkpoint_in_transformers(tmp_path, build):
    _, fp32 = build_pair(NAME, seed=3)
    if build == "from_config":
        ours = HookedDiffusionGemma.from_config(fp32.cfg, seed=5, dtype=torch.bfloat16)
    else:
        ours = HookedDiffusionGemma.from_config(fp32.cfg, seed=5).to(torch.bfloat16)
    assert _frequency_dtypes(ours) == {torch.float32}
    ours.save_pretrained(tmp_path)
    reference = DiffusionGemmaForBlockDiffusion.from_pretrained(str(tmp_path), dtype=torch.bfloat16).eval()
    assert _frequency_dtypes(reference.model.decoder) == {torch.float32}
    ids, canvas = _inputs(fp32.cfg.vocab_size, fp32.cfg.canvas_length)
    with torch.no_grad():
        assert torch.equal(ours(ids, canvas), reference(input_ids=ids, decoder_input_ids=canvas).logits)


def test_float64_casts_still_reach_the_frequencies():
    _, ours = build_pair(NAME, seed=3)
    assert _frequency_dtypes(ours.to(torch.float64)) == {torch.float64}


def test_a_bf16_forward_copies_no_more_bytes_than_transformers():
    # Each conversion of the hidden state to fp32 and back is a copy kernel on a GPU; a second,
    # redundant one per norm cost our 26B generate step ~1 ms against transformers'.
    reference, ours = build_pair(NAME, seed=2, dtype=torch.bfloat16)
    ids, canvas = _inputs(CONFIGS[NAME]["vocab_size"], CANVAS[NAME])
    self_cond = torch.randn(2, CANVAS[NAME], CONFIGS[NAME]["vocab_size"])
    ours_copies = count_copies(lambda: ours(ids, canvas, self_cond))
    reference_copies = count_copies(
        lambda: reference(input_ids=ids, decoder_input_ids=canvas, self_conditioning_logits=self_cond)
    )
    assert ours_copies.calls <= reference_copies.calls
    assert ours_copies.bytes <= reference_copies.bytes, (ours_copies.bytes_by_site, reference_copies.bytes_by_site)


def test_a_bf16_generation_copies_and_launches_no_more_than_transformers():
    # A 26B generate step on a GPU is bound by kernel launches and copies as much as by matmuls: the
    # whole loop (decoder passes, sampling, acceptance, renoising) must not do more of either.
    reference, ours = build_pair(NAME, seed=2, dtype=torch.bfloat16)
    prompt = torch.randint(3, CONFIGS[NAME]["vocab_size"], (1, 7), generator=torch.Generator().manual_seed(0))
    settings = dict(
        max_new_tokens=CANVAS[NAME],
        max_denoising_steps=6,
        entropy_bound=0.4,
        stability_threshold=0,
        confidence_threshold=1e-6,
        pad_token_id=0,
        eos_token_id=None,
    )
    result, copies, writes = count_generation(lambda: ours.generate(prompt, progress=False, **settings))
    expected, reference_copies, reference_writes = count_generation(
        lambda: reference_generate(reference, prompt, **settings)
    )
    assert torch.equal(result.sequences, expected.sequences)
    assert copies.calls <= reference_copies.calls
    assert copies.bytes <= reference_copies.bytes, (copies.bytes_by_site, reference_copies.bytes_by_site)
    assert writes.calls <= reference_writes.calls, writes.ops - reference_writes.ops
