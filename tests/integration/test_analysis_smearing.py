"""Token and sequence smearing on hand-built traces with known scores, and a toy-model run."""

from __future__ import annotations

import math

import pytest
import torch
from traces import make_trace

from diffusionlens import ReplayNoise
from diffusionlens.analysis import answer_mask, sequence_smearing, token_smearing, token_smearing_mass


def smear_trace() -> object:
    # row 0: final [5, 6, 7, eos, pad]; row 1: final [4, 4, eos, pad, pad] (a repeated token is not smearing)
    final = torch.tensor([[5, 6, 7, 1, 0], [4, 4, 1, 0, 0]])
    tokens = torch.tensor(
        [
            [[5, 6], [7, 6], [7, 9], [7, 1], [6, 0]],
            [[4, 9], [4, 2], [4, 1], [4, 0], [0, 1]],
        ]
    )[None]  # [step=1, batch, canvas, k=2]
    probs = torch.tensor(
        [
            [[0.6, 0.3], [0.5, 0.4], [0.9, 0.1], [0.2, 0.7], [0.5, 0.5]],
            [[0.8, 0.1], [0.5, 0.5], [0.6, 0.3], [0.1, 0.9], [0.9, 0.1]],
        ]
    )[None]
    return make_trace(final[None], top_k_tokens=tokens, top_k_probs=probs)


def test_token_smearing_known_scores():
    trace = smear_trace()
    mask = answer_mask(trace, 1)
    own, near = token_smearing_mass(trace, window=1, mask=mask)
    # row 0: own 5@0 .6 + 6@1 .4 + 7@2 .9; near 6@0 .3 + 7@1 .5 + 7@3 .2 (6@4 is 3 away)
    # row 1: own 4@0 .8 + 4@1 .5; near 4@2 .6 (4@3 is 2 away from the last home)
    assert own[0].tolist() == pytest.approx([1.9, 1.3])
    assert near[0].tolist() == pytest.approx([1.0, 0.6])
    assert token_smearing(trace, window=1, mask=mask)[0].tolist() == pytest.approx([1.0 / 2.9, 0.6 / 1.9])
    # window 3 adds 6@4 (row 0) and 4@3 (row 1)
    assert token_smearing(trace, window=3, mask=mask)[0].tolist() == pytest.approx([1.5 / 3.4, 0.7 / 2.0])
    # one token: 7 has its home at 2, smeared to 1 and 3; row 1 has no 7 at all
    score7 = token_smearing(trace, window=1, token_id=7, mask=mask)[0]
    assert score7[0].item() == pytest.approx(0.7 / 1.6) and math.isnan(score7[1].item())
    # without a mask, eos (1) at position 3 of row 0 becomes a home: its .7 there is own mass
    own_all, _ = token_smearing_mass(trace, window=1)
    assert own_all[0, 0].item() == pytest.approx(1.9 + 0.7 + 0.5)  # 0 (pad) at position 4 is a home too
    bare = make_trace(trace.argmax)
    with pytest.raises(ValueError, match="record_top_k"):
        token_smearing(bare)


def test_sequence_smearing_known_shift():
    final = [5, 6, 7, 8, 1, 0]
    trace = make_trace(torch.tensor([[9, 5, 6, 7, 8, 0], [5, 7, 6, 8, 1, 0], final])[:, None])
    mask = answer_mask(trace, 1)  # span 5 6 7 8
    result = sequence_smearing(trace, max_shift=2, mask=mask)
    assert result.shifts == [0, -1, 1, -2, 2]
    # step 0: everything one to the right -> match(+1) = 4/4, match(0) = 0
    assert result.match[:, 0, 0].tolist() == pytest.approx([0.0, 0.0, 1.0, 0.0, 0.0])
    # step 1 (5 7 6 8): match(0) = 2/4; match(-1): [5,7,6] vs [6,7,8] = 1/3; match(+1): [7,6,8,1] vs [5,6,7,8] = 1/4
    assert result.match[:, 1, 0].tolist() == pytest.approx([0.5, 1 / 3, 1 / 4, 0.0, 0.0])
    assert result.score[:, 0].tolist() == pytest.approx([1.0, 1 / 3 - 0.5, -1.0])
    assert result.best_shift[:, 0].tolist() == [1, -1, -1]


def test_smearing_on_the_toy(toy):
    result = toy.generate(
        toy.to_tokens(["squares 400 800:", "347+589="]),
        noise=ReplayNoise(0),
        record_top_k=4,
        progress=False,
        max_new_tokens=toy.cfg.canvas_length,
        max_denoising_steps=8,
    )
    trace = result.trace[0]
    mask = answer_mask(trace, toy.cfg.eos_token_ids)
    score = token_smearing(trace, window=2, mask=mask)
    own, near = token_smearing_mass(trace, window=2, mask=mask)
    assert score.shape == (trace.n_steps, 2)
    assert torch.allclose(score, near / (own + near))
    assert bool(((score >= 0) & (score <= 1)).all())
    seq = sequence_smearing(trace, max_shift=2, mask=mask)
    # at the last step the argmax is the final canvas: in-place match is 1, so the score is at most 0
    assert seq.match[0, -1].tolist() == [1.0, 1.0]
    assert bool((seq.score[-1] <= 0).all())
