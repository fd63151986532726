"""Logit lens by step on the toy model, checked against DenoisingCache.logit_lens step by step."""

from __future__ import annotations

import pytest
import torch

from diffusionlens import ReplayNoise
from diffusionlens.analysis import logit_lens_by_step

NAMES = ["decoder.blocks.*.hook_resid_pre", "decoder.blocks.5.hook_resid_post"]


@pytest.fixture(scope="module")
def run(toy):
    settings = dict(noise=ReplayNoise(2), progress=False, max_new_tokens=toy.cfg.canvas_length, max_denoising_steps=6)
    return toy.generate_with_cache(toy.to_tokens("squares 400 800:"), names_filter=NAMES, **settings)


def test_matches_the_cache_logit_lens(toy, run):
    result, cache = run
    trace = result.trace[0]
    lens = logit_lens_by_step(cache, top=3, final=trace)
    n_steps, n_layers = trace.n_steps, toy.cfg.num_hidden_layers + 1
    assert lens.top_tokens.shape == (n_steps, n_layers, 1, toy.cfg.canvas_length, 3)
    assert lens.final_probs.shape == (n_steps, n_layers, 1, toy.cfg.canvas_length)
    for step in range(n_steps):
        probs = torch.softmax(cache.logit_lens(step).float(), -1)
        best = probs.topk(3, dim=-1)
        assert torch.equal(lens.top_tokens[step], best.indices)
        assert torch.allclose(lens.top_probs[step], best.values, atol=1e-6)
        final = probs.gather(-1, trace.final[None, :, :, None].expand(n_layers, -1, -1, 1)).squeeze(-1)
        assert torch.allclose(lens.final_probs[step], final, atol=1e-6)
    # after the last block at the last step the lens is the model's own prediction: the final canvas
    assert torch.equal(lens.top1[-1, -1, 0], trace.final[0])
    first = lens.first_layer_correct()
    assert first.shape == (n_steps, 1, toy.cfg.canvas_length)
    assert bool((first[-1] >= 0).all())


def test_positions_and_recorded_subset(toy, run):
    result, cache = run
    full = logit_lens_by_step(cache, top=2, final=result.trace[0].final)
    some = logit_lens_by_step(cache, positions=[3, 0], top=2)
    assert some.positions == [3, 0] and some.final_probs is None
    assert torch.equal(some.top_tokens, full.top_tokens[:, :, :, [3, 0]])
    settings = dict(noise=ReplayNoise(2), progress=False, max_new_tokens=toy.cfg.canvas_length, max_denoising_steps=6)
    _, narrow = toy.generate_with_cache(
        toy.to_tokens("squares 400 800:"), names_filter=NAMES, positions=[0, 1, 2], **settings
    )
    lens = logit_lens_by_step(narrow, positions=[1, 2], top=2, final=result.trace[0])
    assert torch.allclose(lens.top_probs, full.top_probs[:, :, :, [1, 2]], atol=1e-5)
    assert torch.allclose(lens.final_probs, full.final_probs[:, :, :, [1, 2]], atol=1e-5)
    with pytest.raises(ValueError, match="not recorded"):
        logit_lens_by_step(narrow, positions=[5])
