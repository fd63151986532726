"""Variable-transparency metrics on hand-built traces, and AUROC."""

from __future__ import annotations

import pytest
import torch

from diffusionlens.analysis import auroc, top1_matches_final, top_k_mass, transparency_summary
from diffusionlens.sampling.trace import CanvasTrace


def _trace(top_tokens, top_probs, final):
    steps, batch, length = top_tokens.shape[:3]
    zeros = torch.zeros(steps, batch, length, dtype=torch.long)
    argmax = zeros.clone()
    argmax[-1] = final
    return CanvasTrace(
        input_canvas=zeros,
        sampled=zeros,
        argmax=argmax,
        entropy=zeros.float(),
        accepted=zeros.bool(),
        next_canvas=zeros,
        finished=torch.zeros(steps, batch, dtype=torch.bool),
        temperature=torch.ones(steps),
        t=torch.arange(steps, 0, -1),
        top_k_tokens=top_tokens,
        top_k_probs=top_probs,
    )


def test_top_k_mass_and_matches():
    final = torch.tensor([[5, 6, 7, 8]])
    tokens = torch.tensor([[[[5, 1], [7, 2], [9, 3], [6, 4]]]])  # one step
    probs = torch.tensor([[[[0.6, 0.3], [0.5, 0.1], [0.9, 0.05], [0.2, 0.2]]]])
    trace = _trace(tokens, probs, final)
    assert torch.allclose(top_k_mass(trace, 1)[0, 0], torch.tensor([0.6, 0.5, 0.9, 0.2]))
    assert torch.allclose(top_k_mass(trace, 2)[0, 0], torch.tensor([0.9, 0.6, 0.95, 0.4]))
    assert top1_matches_final(trace)[0, 0].tolist() == [True, False, False, False]
    # 7 is final[2] (one to the right of position 1), 6 is final[1] (two to the left of position 3)
    assert top1_matches_final(trace, window=2)[0, 0].tolist() == [True, True, False, True]
    summary = transparency_summary(trace, ks=(1,))
    assert summary["top1_is_final"].item() == pytest.approx(0.25)
    assert summary["top1_near_final"].item() == pytest.approx(0.75)
    with pytest.raises(ValueError, match="record_top_k"):
        top_k_mass(trace, 3)


def test_auroc():
    assert auroc(torch.tensor([0.9, 0.8, 0.1, 0.2]), torch.tensor([1, 1, 0, 0])) == 1.0
    assert auroc(torch.tensor([0.1, 0.2, 0.9, 0.8]), torch.tensor([1, 1, 0, 0])) == 0.0
    assert auroc(torch.tensor([0.5, 0.5]), torch.tensor([1, 0])) == 0.5
    assert auroc(torch.tensor([0.3, 0.6, 0.4, 0.7]), torch.tensor([0, 1, 1, 0])) == pytest.approx(0.5)
