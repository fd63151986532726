"""Intermediate tokens and the attention later steps pay them: hand-built traces and patterns with known
answers, and a toy-model run that checks where the canvas keys sit in the decoder's attention."""

from __future__ import annotations

import pytest
import torch
from einops import einsum
from traces import make_trace

from diffusionlens import DenoisingCache, ReplayNoise
from diffusionlens.analysis import (
    IntermediateToken,
    attention_to_intermediate,
    intermediate_mask,
    intermediate_tokens,
)

PATTERN = "decoder.blocks.0.attn.hook_pattern"


def small_trace():
    # final [5, 6, 7]; position 1 shows 9 at step 0 (accepted there) and 8 at step 1
    argmax = torch.tensor([[5, 9, 7], [5, 8, 7], [5, 6, 7]])[:, None]
    accepted = torch.tensor([[False, True, False], [False, False, False], [True, True, True]])[:, None]
    return make_trace(argmax, accepted=accepted)


def test_intermediate_tokens_listed():
    trace = small_trace()
    assert intermediate_tokens(trace) == [
        IntermediateToken(row=0, step=0, position=1, token=9, final_token=6),
        IntermediateToken(row=0, step=1, position=1, token=8, final_token=6),
    ]
    assert intermediate_tokens(trace, source="accepted") == [IntermediateToken(0, 0, 1, 9, 6)]
    assert intermediate_tokens(trace, mask=torch.tensor([[True, False, True]])) == []
    trace.finished = torch.tensor([[True], [True], [True]])  # stopped after step 0: later steps are not read
    assert intermediate_mask(trace)[:, 0, 1].tolist() == [True, False, False]
    with pytest.raises(ValueError, match="source"):
        intermediate_tokens(trace, source="sampled")


def test_attention_mass_by_hand():
    trace = small_trace()
    cache = DenoisingCache([PATTERN])
    # two prompt keys, then the three canvas keys; one head
    step1 = torch.tensor([[0.1, 0.1, 0.2, 0.5, 0.1], [0.2, 0.2, 0.1, 0.3, 0.2], [0.0, 0.0, 0.3, 0.3, 0.4]])
    cache.backend.put(0, 0, {PATTERN: torch.full((1, 1, 3, 5), 0.2)})
    cache.backend.put(0, 1, {PATTERN: step1[None, None]})
    result = attention_to_intermediate(cache, trace)
    assert result.steps == [0, 1] and result.layers == [0]
    assert result.n_positions[:, 0].tolist() == [0, 1]  # step 1 sees position 1 (intermediate at step 0)
    # queries 0 and 2 put .5 and .3 on position 1; query 1 is position 1 itself and is left out
    assert result.mass[:, 0, 0].tolist() == pytest.approx([0.0, 0.8 / 3])
    assert result.canvas_mass[1, 0, 0].item() == pytest.approx((0.6 + 0.3 + 0.6) / 3)
    assert result.relative()[1, 0, 0].item() == pytest.approx((0.8 / 1.5) / (1 / 2))
    with pytest.raises(ValueError, match="hook_pattern"):
        attention_to_intermediate(DenoisingCache(["decoder.blocks.0.hook_resid_post"]), trace)
    with pytest.raises(ValueError, match="layers"):
        attention_to_intermediate(cache, trace, layers=[3])


def test_canvas_keys_are_the_last_keys_on_the_toy(toy):
    ids = toy.to_tokens("688+98=")  # changes its draft under ReplayNoise(3) on the shipped checkpoint
    length, prompt_len = toy.cfg.canvas_length, ids.shape[1]
    names = [f"decoder.blocks.{layer}.attn.{h}" for layer in (0, 2) for h in ("hook_pattern", "hook_attn_scores")]
    names += [f"decoder.blocks.{layer}.attn.{h}" for layer in (0, 2) for h in ("hook_rot_q", "hook_rot_k")]
    result, cache = toy.generate_with_cache(
        ids, names_filter=names, noise=ReplayNoise(3), progress=False, max_new_tokens=length, max_denoising_steps=8
    )
    trace = result.trace[0]
    kept = {0: min(prompt_len, toy.cfg.sliding_window - 1), 2: prompt_len}  # sliding layer 0 keeps a window
    for layer in (0, 2):
        scores = cache.get(f"decoder.blocks.{layer}.attn.hook_attn_scores", step=1)
        assert scores.shape[-1] == kept[layer] + length
        q = cache.get(f"decoder.blocks.{layer}.attn.hook_rot_q", step=1)
        k = cache.get(f"decoder.blocks.{layer}.attn.hook_rot_k", step=1)
        k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
        canvas_scores = einsum(q, k, "b q h d, b k h d -> b h q k")
        assert torch.allclose(scores[..., -length:], canvas_scores, atol=1e-4)  # the canvas keys come last
    flagged = intermediate_mask(trace)
    assert flagged[:-1].any(), "this run should change its draft at least once"
    got = attention_to_intermediate(cache, trace, within=2)
    assert got.layers == [0, 2] and got.steps == list(range(trace.n_steps))
    for i, step in enumerate(got.steps):
        keys = flagged[max(0, step - 2) : step].any(0)[0]
        for j, layer in enumerate((0, 2)):
            pattern = cache.get(f"decoder.blocks.{layer}.attn.hook_pattern", step=step)[0]
            expected, canvas = 0.0, 0.0
            for qpos in range(length):
                for p in range(length):
                    if p != qpos:
                        value = float(pattern[:, qpos, kept[layer] + p].sum())
                        canvas += value
                        expected += value if keys[p] else 0.0
            n = pattern.shape[0] * length
            assert got.mass[i, j, 0].item() == pytest.approx(expected / n, abs=1e-5)
            assert got.canvas_mass[i, j, 0].item() == pytest.approx(canvas / n, abs=1e-5)
        assert got.n_positions[i, 0] == int(keys.sum())
