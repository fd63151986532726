"""Commit order and non-chronology scores on hand-built traces with known answers."""

from __future__ import annotations

import math

import pytest
import torch
from traces import make_trace

from diffusionlens.analysis import (
    answer_mask,
    commit_order,
    commit_order_summary,
    commit_steps,
    kendall_tau_b,
    out_of_order_share,
)


def by_position(columns: list[list[int]]) -> torch.Tensor:
    """`[step, 1, canvas]` from one list of per-step tokens per position."""
    return torch.tensor(columns).T[:, None, :]


def test_known_commit_order():
    # commit steps: position 0 at step 3, 1 at step 1, 2 at step 0, 3 at step 2
    trace = make_trace(by_position([[1, 1, 1, 2], [1, 2, 2, 2], [2, 2, 2, 2], [1, 1, 2, 2]]))
    (order,) = commit_order(trace)
    assert order.commit_steps.tolist() == [3, 1, 0, 2]
    assert order.order.tolist() == [2, 1, 3, 0]
    # pairs: (0,1) (0,2) (0,3) (1,2) discordant, (1,3) (2,3) concordant: (2 - 4) / 6
    assert order.tau == pytest.approx(-1 / 3)
    assert order.out_of_order_share == pytest.approx(3 / 4)
    assert order.first_committed() == [2]
    # restricted to positions 1..3: commits [1, 0, 2]
    mask = torch.tensor([[False, True, True, True]])
    (masked,) = commit_order(trace, mask)
    assert masked.positions.tolist() == [1, 2, 3]
    assert masked.tau == pytest.approx(1 / 3)
    assert masked.out_of_order_share == pytest.approx(1 / 3)
    assert commit_steps(trace, mask).tolist() == [[-1, 1, 0, 2]]
    with pytest.raises(ValueError, match="answer_mask"):
        commit_order(trace, torch.ones(1, 3, dtype=torch.bool))


def test_kendall_tau_b_ties_and_extremes():
    # ties in y: C = 4, D = 0, n0 = 6, ties_y = 2 -> 4 / sqrt(6 * 4)
    assert kendall_tau_b([0, 1, 2, 3], [0, 0, 1, 1]) == pytest.approx(4 / math.sqrt(24))
    # ties in both: x = [0, 0, 1, 2], y = [1, 2, 2, 3]: C = 4 (0-2, 0-3, 1-3, 2-3), D = 0, tx = 1, ty = 1
    assert kendall_tau_b([0, 0, 1, 2], [1, 2, 2, 3]) == pytest.approx(4 / 5)
    assert kendall_tau_b([0, 1, 2], [5, 6, 7]) == pytest.approx(1.0)
    assert kendall_tau_b([0, 1, 2], [7, 6, 5]) == pytest.approx(-1.0)
    assert math.isnan(kendall_tau_b([0, 1, 2], [4, 4, 4]))
    assert math.isnan(kendall_tau_b([0], [1]))
    assert out_of_order_share([0, 0, 1, 1]) == 0.0
    assert out_of_order_share([2, 0, 1, 3]) == pytest.approx(0.5)
    assert math.isnan(out_of_order_share([]))


def test_answer_mask_and_summary():
    final = torch.tensor([[5, 6, 1, 0, 1], [5, 6, 7, 8, 9]])
    assert answer_mask(final, 1).tolist() == [[True, True, False, False, False], [True] * 5]
    assert answer_mask(final, [1], include_eos=True)[0].tolist() == [True, True, True, False, False]
    assert answer_mask(final, ()).all()
    steps = torch.tensor([[[1, 1], [2, 2]], [[1, 1], [2, 3]]])  # [step, batch=2, canvas=2]
    trace = make_trace(steps)
    orders = commit_order(trace)
    # row 0: commits [0, 0] (tau undefined); row 1: commits [0, 1] -> tau 1
    assert orders[0].commit_steps.tolist() == [0, 0] and orders[1].commit_steps.tolist() == [0, 1]
    assert math.isnan(orders[0].tau) and orders[1].tau == pytest.approx(1.0)
    summary = commit_order_summary(orders)
    assert summary["mean_tau"] == pytest.approx(1.0)
    assert summary["rows_with_tau"] == 1.0
    assert summary["mean_out_of_order_share"] == 0.0
