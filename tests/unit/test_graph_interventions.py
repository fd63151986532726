"""Checking an attribution graph by intervention (#35 item 5), on a random tiny config in float64.

In the replacement model the graph is exact: ablating or steering a feature with every other feature's gate
frozen moves the target by the graph's total effect (its paths, across steps included), and with every other
feature held fixed by its direct edge. On the real model, an intervention that sets a feature to its own
activation changes nothing, the replay reproduces the recorded target, and bad requests are refused.
"""

from __future__ import annotations

import math

import pytest
import torch
from random_models import GRAPH_OPTIONS as OPTIONS
from random_models import GRAPH_PROMPT as PROMPT
from random_models import GRAPH_TARGET as TARGET
from random_models import float64_graph_setup

from diffusionlens.components import norms as norms_module
from diffusionlens.graphs.splicing import FeatureIntervention
from diffusionlens.graphs.validate import (
    RecordedRun,
    check_graph,
    direct_effects,
    graph_target,
    intervention_agreement,
    pearson,
    replacement_target_changes,
    spearman,
    total_effects,
)
from diffusionlens.sampling import ReplayNoise

ATOL = 1e-8  # float64 throughout the replacement model, as tests/unit/test_attribution_graphs.py


@pytest.fixture(scope="module")
def setup():
    with float64_graph_setup() as s:
        s.target = graph_target(s.graph)
        yield s


def feature_site(graph, index: int) -> tuple[int, int, int, int]:
    return tuple(int(t[index]) for t in (graph.step, graph.layer, graph.position, graph.feature))


def test_graph_spans_steps_and_has_indirect_paths(setup):
    """The checks below mean something: features at earlier steps reach the target, and total effects differ
    from direct ones (paths through other features). (An earlier step's feature has a direct edge too: through
    its step's logits and the self-conditioning, the linear path that passes no other feature.)"""
    graph = setup.graph
    features = graph.indices("feature")
    total, direct = total_effects(graph)[features], direct_effects(graph)[features]
    earlier = graph.step[features] < setup.target[0]
    assert earlier.any() and (total[earlier] != 0).any()
    assert ((total - direct).abs() > 1e-3).sum() >= len(features) // 4


def test_ablation_in_the_replacement_model_is_minus_the_total_effect(setup):
    """Every feature of the graph (every influential active feature: `max_feature_nodes=None`)."""
    graph, total, direct = setup.graph, total_effects(setup.graph), direct_effects(setup.graph)
    features = graph.indices("feature").tolist()
    ablations = [[FeatureIntervention(*feature_site(graph, index), 0.0)] for index in features]
    rm, sources, target = setup.rm, setup.sources, setup.target
    linear = torch.tensor(replacement_target_changes(rm, sources, target, ablations, "linear"), dtype=torch.float64)
    fixed = torch.tensor(replacement_target_changes(rm, sources, target, ablations, "fixed"), dtype=torch.float64)
    torch.testing.assert_close(linear, -total[features], rtol=0, atol=ATOL)
    torch.testing.assert_close(fixed, -direct[features], rtol=0, atol=ATOL)


def test_steering_in_the_replacement_model_scales_the_total_effect(setup):
    graph, total = setup.graph, total_effects(setup.graph)
    features = graph.indices("feature")
    strongest = features[torch.argsort(total[features].abs(), descending=True)[:8]].tolist()
    steered = [[FeatureIntervention(*feature_site(graph, i), 3.0 * float(graph.activation[i]))] for i in strongest]
    changes = replacement_target_changes(setup.rm, setup.sources, setup.target, steered, "linear")
    torch.testing.assert_close(torch.tensor(changes, dtype=torch.float64), 2.0 * total[strongest], rtol=0, atol=ATOL)


def test_two_ablations_add_in_the_linear_replacement_model(setup):
    graph, total = setup.graph, total_effects(setup.graph)
    first, second = graph.indices("feature")[:2].tolist()
    both = [FeatureIntervention(*feature_site(graph, i), 0.0) for i in (first, second)]
    (change,) = replacement_target_changes(setup.rm, setup.sources, setup.target, [both], "linear")
    assert change == pytest.approx(-float(total[first] + total[second]), abs=ATOL)


def test_real_model_replay_and_a_null_intervention(setup):
    """The replay reproduces the recorded target; setting a feature to its own activation (through the error
    term) changes nothing at all; ablating an influential feature changes the target."""
    run = RecordedRun(
        setup.model, setup.transcoders, PROMPT, setup.trajectory, setup.target, noise=ReplayNoise(0), **OPTIONS
    )
    assert run.replay_gap < ATOL
    graph, total = setup.graph, total_effects(setup.graph)
    features = graph.indices("feature")
    strongest = int(features[torch.argmax(total[features].abs())])
    site = feature_site(graph, strongest)
    assert run.target_change([FeatureIntervention(*site, float(graph.activation[strongest]))]) == 0.0
    assert abs(run.target_change([FeatureIntervention(*site, 0.0)])) > 1e-6


def test_check_graph_reports_each_node_and_random_features(setup):
    result = check_graph(
        setup.model,
        setup.transcoders,
        PROMPT,
        setup.trajectory,
        setup.graph,
        noise=ReplayNoise(0),
        top_n=4,
        steps=[0, 1],
        n_random=3,
        seed=2,
        **OPTIONS,
    )
    assert len(result.nodes) == 4 and all(n.step in (0, 1) for n in result.nodes)
    assert result.summary["n_top_earlier_steps"] == 4
    influence = setup.graph.node_influence()
    ranked = sorted((n.influence for n in result.nodes), reverse=True)
    assert ranked == [n.influence for n in result.nodes]
    features = setup.graph.indices("feature")
    at_steps = features[setup.graph.step[features] <= 1]
    assert ranked[0] == pytest.approx(float(influence[at_steps].max()))
    top_sites = {(n.step, n.layer, n.position, n.feature) for n in result.nodes}
    assert len(result.random) == 3
    for node in result.random:
        assert (node.step, node.layer, node.position, node.feature) not in top_sites
        assert setup.sources.acts[node.step][node.layer][node.position, node.feature] > 0
        assert math.isfinite(node.measured)
    for node in result.nodes:
        assert node.predicted == -node.total and math.isfinite(node.measured)
        assert node.steer_predicted == pytest.approx(node.total)
    assert len(result.table().splitlines()) == 1 + 4 + 3


def test_intervention_agreement_takes_attributes_keywords_and_checks_the_same_graph(setup):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(norms_module, "COMPUTE_DTYPE", torch.float64)
        result = intervention_agreement(
            setup.model,
            setup.transcoders,
            PROMPT,
            TARGET,
            noise=ReplayNoise(0),
            max_feature_nodes=None,
            row_chunk=3,
            store_on="cpu",
            top_n=2,
            n_random=1,
            **OPTIONS,
        )
    assert result.graph.kind == setup.graph.kind
    # row chunks regroup the same per-row sums: equal up to the order of float64 reductions
    torch.testing.assert_close(result.graph.dense(), setup.graph.dense(), atol=1e-12, rtol=0)
    assert result.graph.metadata["generate_options"] == {k: repr(v) for k, v in OPTIONS.items()}
    assert result.summary["replay_gap"] < ATOL and len(result.nodes) == 2 and len(result.random) == 1


def test_refusals(setup):
    with pytest.raises(ValueError, match="rank_by must be one of"):
        check_graph(setup.model, setup.transcoders, PROMPT, setup.trajectory, setup.graph, rank_by="size")
    with pytest.raises(ValueError, match="no feature nodes at steps"):
        check_graph(setup.model, setup.transcoders, PROMPT, setup.trajectory, setup.graph, steps=[9], **OPTIONS)
    with pytest.raises(ValueError, match="response must be one of"):
        replacement_target_changes(setup.rm, setup.sources, setup.target, [], "free")
    run = RecordedRun(
        setup.model, setup.transcoders, PROMPT, setup.trajectory, setup.target, noise=ReplayNoise(0), **OPTIONS
    )
    with pytest.raises(ValueError, match="not at steps 0..3"):
        run.target_change([FeatureIntervention(4, 0, 0, 0, 0.0)])
    with pytest.raises(ValueError, match="did not replay"):
        RecordedRun(
            setup.model, setup.transcoders, PROMPT, setup.trajectory, setup.target, noise=ReplayNoise(1), **OPTIONS
        )


def test_correlations():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert pearson(x, -x) == pytest.approx(-1.0)
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([0.0, 0.0, 5.0])) == pytest.approx(1.0)
    assert math.isnan(pearson(x, torch.ones(4)))
