"""Splitting an attribution graph's target by source step and channel (#35 item 7), on a random tiny config in
float64 with random transcoders, as tests/unit/test_attribution_graphs.py: the per-node terms add up to the
target's value in the replacement model, every grouping keeps that sum, each node lands in the channel its step
and kind say, and circuit-tracer's influence over the source kinds sums to 1."""

from __future__ import annotations

import pytest
import torch
from random_models import GRAPH_TARGET as TARGET
from random_models import float64_graph_setup

from diffusionlens.graphs.attribution import attribute_trajectory
from diffusionlens.graphs.breakdown import (
    CHANNELS,
    channel_breakdown,
    node_channels,
    node_contributions,
    step_breakdown,
    target_value,
)
from diffusionlens.graphs.validate import graph_target, total_effects

ATOL = 1e-8  # float64 throughout the replacement model, as tests/unit/test_attribution_graphs.py


@pytest.fixture(scope="module")
def setup():
    with float64_graph_setup() as s:
        s.budget = attribute_trajectory(s.model, s.transcoders, s.trajectory, TARGET, max_feature_nodes=5)
        yield s


def test_terms_add_up_to_the_target_in_the_replacement_model(setup):
    graph = setup.graph
    step, position, tokens = graph_target(graph)
    logits = setup.rm.forward(setup.sources).pre_logits[step]
    replacement_value = float(sum(sign * logits[position, t] for t, sign in tokens))
    assert target_value(graph) == pytest.approx(replacement_value, abs=ATOL)
    contributions = node_contributions(graph)
    assert float(contributions.sum()) == pytest.approx(replacement_value, abs=ATOL)
    # the features' terms are their biases' share only: without them the sum misses exactly that much
    features = graph.indices("feature")
    assert len(features) > 0 and float(graph.bias[features].abs().sum()) > 1e-3
    sources_only = contributions.sum() - contributions[features].sum()
    assert float(sources_only) != pytest.approx(replacement_value, abs=1e-4)


def test_source_terms_are_total_effects_and_feature_terms_scale_them(setup):
    graph = setup.graph
    contributions, total = node_contributions(graph), total_effects(graph)
    for kind in ("token", "error", "prompt"):
        nodes = graph.indices(kind)
        assert torch.equal(contributions[nodes], total[nodes])
    features = graph.indices("feature")
    expected = graph.bias[features] * total[features] / graph.activation[features]
    torch.testing.assert_close(contributions[features], expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("which", ["full", "budget"])
def test_step_and_channel_breakdowns_keep_the_sum(setup, which):
    graph = setup.graph if which == "full" else setup.budget
    total = float(node_contributions(graph).sum())
    by_step, by_channel = step_breakdown(graph), channel_breakdown(graph)
    assert by_step.attributed == pytest.approx(total, abs=ATOL)
    assert by_channel.attributed == pytest.approx(total, abs=ATOL)
    assert sum(r.n_nodes for r in by_step.rows) == graph.n_nodes == sum(r.n_nodes for r in by_channel.rows)
    assert [r.channel for r in by_channel.rows] == list(CHANNELS)
    if which == "full":
        assert abs(by_step.unattributed) < ATOL
    else:  # a budget drops features, and their share of the target with them
        assert abs(by_step.unattributed) > 1e-6
    steps = sorted({r.step for r in by_step.rows})
    assert steps == [-1, *range(graph_target(graph)[0] + 1)]
    influence = graph.node_influence()
    sources = torch.cat([graph.indices(k) for k in ("token", "error", "prompt")])
    assert float(influence[sources].sum()) == pytest.approx(1.0, abs=1e-9)
    source_rows = [r for r in by_step.rows if r.kind in ("token", "error", "prompt")]
    assert sum(r.influence for r in source_rows) == pytest.approx(1.0, abs=1e-9)


def test_channels_follow_step_and_kind(setup):
    graph = setup.graph
    target_step = graph_target(graph)[0]
    channels = node_channels(graph)
    for index, channel in enumerate(channels):
        kind, step = graph.kind[index], int(graph.step[index])
        if kind in ("prompt", "logit"):
            assert channel == (CHANNELS[4] if kind == "prompt" else CHANNELS[5])
        elif step < target_step:
            assert channel == CHANNELS[0]
        else:
            assert step == target_step
            assert channel == {"token": CHANNELS[1], "error": CHANNELS[2], "feature": CHANNELS[3]}[kind]
    # earlier steps reach the target: the cross-step channel carries a nonzero share
    by_channel = {r.channel: r for r in channel_breakdown(graph).rows}
    assert abs(by_channel[CHANNELS[0]].contribution) > 1e-6
    assert by_channel[CHANNELS[0]].n_nodes > 0
