"""Attribution graphs on the shipped toy model in float32 (#35): the squares trajectory replays, the replacement
model with its error nodes reproduces the toy's logits at every step, and every row's edges plus bias reach its
pre-activation, at float32's reordering tolerance (the exact float64 checks are tests/unit/test_attribution_graphs.py).
"""

from __future__ import annotations

import pytest
import torch
from tolerance import summed_parts_atol, trajectory_atol

from diffusionlens import ReplayNoise
from diffusionlens.graphs.attribution import attribute_trajectory
from diffusionlens.graphs.replacement import ReplacementModel, recorded_sources
from diffusionlens.graphs.trajectory import record_trajectory
from diffusionlens.graphs.transcoders import random_transcoders
from diffusionlens.toy import EXAMPLE_PROMPTS


@pytest.fixture(scope="module")
def squares(toy):
    input_ids = toy.to_tokens(EXAMPLE_PROMPTS["squares"])
    trajectory = record_trajectory(toy, input_ids, noise=ReplayNoise(0), max_new_tokens=toy.cfg.canvas_length)
    transcoders = random_transcoders(toy, 4, seed=0)  # narrow: every active feature becomes a row
    return input_ids, trajectory, transcoders


def test_the_trajectory_is_the_generation(toy, squares):
    input_ids, trajectory, _ = squares
    result = toy.generate(input_ids, noise=ReplayNoise(0), max_new_tokens=toy.cfg.canvas_length, progress=False)
    assert trajectory.n_steps == result.trace.steps(0)
    for step, frozen in enumerate(trajectory.steps):
        assert torch.equal(frozen.canvas, result.trace[0].input_canvas[step][0].cpu())


def test_replacement_with_error_nodes_reproduces_the_toys_logits(toy, squares):
    _, trajectory, transcoders = squares
    out = ReplacementModel(toy, transcoders, trajectory).forward(recorded_sources(trajectory, transcoders))
    atol = trajectory_atol(toy, trajectory.n_steps)
    cap = toy.cfg.final_logit_softcapping
    for step, frozen in enumerate(trajectory.steps):
        torch.testing.assert_close(out.pre_logits[step], frozen.pre_logits, atol=atol, rtol=0)
        torch.testing.assert_close(torch.tanh(out.pre_logits[step] / cap) * cap, frozen.logits, atol=atol, rtol=0)


def test_every_row_sums_to_its_pre_activation_in_float32(toy, squares):
    _, trajectory, transcoders = squares
    target = dict(position=0, step=-1, token=int(trajectory.steps[-1].logits[0].argmax()))
    graph = attribute_trajectory(toy, transcoders, trajectory, target, max_feature_nodes=None)
    assert graph.kind.count("feature") > 500
    dense = graph.dense()
    rows = torch.cat((graph.indices("feature"), graph.indices("logit")))
    parts = torch.cat((dense[rows].T, graph.bias[rows][None]))  # [sources + bias, rows]
    atol = summed_parts_atol(parts)
    torch.testing.assert_close(parts.sum(0), graph.value[rows], atol=atol, rtol=0)
    assert atol < 1e-2 * float(graph.value[rows].abs().max())  # the bound is tight enough to mean something
