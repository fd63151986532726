"""Attribution graphs across denoising steps (#35): exact by construction, checked four ways.

A random tiny config (every tensor randomised: grouped KV heads, sliding and full layers, attention biases, a
prompt longer than the sliding window) with random transcoders, in float64 with float64 norms, over a
trajectory of several steps. (a) every row's edges plus its bias are its pre-activation in the replacement
model; (b) an edge is the effect of perturbing its source in the replacement model, and a pair without an
edge has none; (c) with the error nodes zeroed the target is its non-error edges plus bias; (d) the
replacement model with its error nodes reproduces the real model's logits at every recorded step.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from random_models import CFG, float64_graph_setup
from random_models import GRAPH_OPTIONS as OPTIONS
from random_models import GRAPH_PROMPT as PROMPT
from random_models import GRAPH_TARGET as TARGET

from diffusionlens import HookedDiffusionGemma
from diffusionlens.components import norms as norms_module
from diffusionlens.graphs.attribution import active_feature_edges, attribute, attribute_trajectory
from diffusionlens.graphs.graph import Graph
from diffusionlens.graphs.replacement import Sources, recorded_sources
from diffusionlens.graphs.trajectory import record_trajectory
from diffusionlens.graphs.transcoders import random_transcoders
from diffusionlens.sampling import ReplayNoise

ATOL = 1e-8  # float64 throughout the replacement model: sums of a few hundred terms of size ~1


@pytest.fixture(scope="module")
def setup():
    with float64_graph_setup() as s:  # float64 norms: exact to 1e-8
        yield s


def node_value(s, sources: Sources, index: int) -> float:
    """A row node's pre-activation in the replacement model run from `sources`."""
    g = s.graph
    out = s.rm.forward(sources)
    if g.kind[index] == "logit":
        position = g.metadata["target"]["position"]
        step = g.metadata["target"]["step"]
        return sum(sign * out.pre_logits[step][position, t] for t, sign in g.metadata["target"]["tokens"])
    return out.pre_acts[int(g.step[index])][int(g.layer[index])][int(g.position[index]), int(g.feature[index])]


def perturbed(s, index: int) -> Sources:
    """The recorded sources with source node `index` doubled (its activation, error vector, embedding, or
    prompt coefficient): by linearity the change of a target is exactly the edge between them."""
    g = s.graph
    src = recorded_sources(s.trajectory, s.transcoders)
    step, layer, position = int(g.step[index]), int(g.layer[index]), int(g.position[index])
    kind = g.kind[index]
    if kind == "feature":
        src.acts[step][layer][position, int(g.feature[index])] *= 2
    elif kind == "error":
        src.errors[step][layer][position] *= 2
    elif kind == "token":
        src.token_embed[step] = src.token_embed[step].clone()
        src.token_embed[step][position] *= 2
    else:
        src.prompt[position] *= 2
    return src


def test_trajectory_has_several_steps_and_features(setup):
    g = setup.graph
    assert setup.trajectory.n_steps == 4
    assert g.kind.count("feature") > 100  # every active feature was expanded (max_feature_nodes=None)
    steps_of_features = set(g.step[g.indices("feature")].tolist())
    assert steps_of_features == {0, 1, 2, 3}


def test_a_edges_plus_bias_are_each_rows_pre_activation(setup):
    g = setup.graph
    dense = g.dense()
    rows = torch.cat((g.indices("feature"), g.indices("logit")))
    # value: the replacement model's pre-activation at the recorded sources; bias: the same model with every
    # source zero. Both come from forward passes; the edges from the backward sweep.
    torch.testing.assert_close(dense[rows].sum(1) + g.bias[rows], g.value[rows], atol=ATOL, rtol=0)
    # and the values are the real transcoders' pre-activations on the recorded run
    for i in g.indices("feature")[:50].tolist():
        layer = setup.trajectory.steps[int(g.step[i])].layers[int(g.layer[i])]
        expected = setup.transcoders[int(g.layer[i])].pre_activation(layer.transcoder_input).detach()
        assert abs(float(expected[int(g.position[i]), int(g.feature[i])]) - float(g.value[i])) < ATOL


def test_b_edges_are_the_effect_of_perturbing_their_source(setup):
    g = setup.graph
    dense = g.dense()
    logit = int(g.indices("logit")[0])
    generator = torch.Generator().manual_seed(0)
    features = g.indices("feature")
    checked = {"edge": 0, "no edge": 0}
    # Targets: the logit and features at the last and an early step; sources: every kind, from several steps.
    targets = [logit, *features[g.step[features] == 3][:2].tolist(), *features[g.step[features] == 1][:2].tolist()]
    for target in targets:
        base = node_value(setup, recorded_sources(setup.trajectory, setup.transcoders), target)
        candidates = []
        for kind in ("feature", "error", "token", "prompt"):
            pool = g.indices(kind)
            candidates += pool[torch.randperm(len(pool), generator=generator)[:4]].tolist()
        for source in candidates:
            effect = float(node_value(setup, perturbed(setup, source), target) - base)
            edge = float(dense[target, source])
            assert abs(effect - edge) < ATOL, (g.node_json(source), g.node_json(target), effect, edge)
            checked["edge" if edge != 0 else "no edge"] += 1
    assert checked["edge"] > 20 and checked["no edge"] > 5


def test_b_cross_step_edges_exist_through_self_conditioning(setup):
    g = setup.graph
    dense = g.dense()
    logit = int(g.indices("logit")[0])
    for step in (0, 1, 2):
        sources = g.indices("feature")[g.step[g.indices("feature")] == step]
        assert dense[logit, sources].abs().sum() > 0, f"no edge from step {step} features to the step-3 logit"


def test_c_with_error_nodes_zeroed_the_target_is_its_other_edges(setup):
    g = setup.graph
    dense = g.dense()
    logit = int(g.indices("logit")[0])
    sources = recorded_sources(setup.trajectory, setup.transcoders)
    sources.errors = [[torch.zeros_like(e) for e in step] for step in sources.errors]
    without_errors = node_value(setup, sources, logit)
    non_error = torch.cat([g.indices(k) for k in ("feature", "token", "prompt")])
    expected = dense[logit, non_error].sum() + g.bias[logit]
    assert abs(float(without_errors) - float(expected)) < ATOL
    # and the error nodes do carry part of it, so this is not the full value again
    assert abs(float(without_errors) - float(g.value[logit])) > 1e-3


def test_d_replacement_with_errors_reproduces_the_real_logits(setup):
    trajectory, model = setup.trajectory, setup.model
    out = setup.rm.forward(setup.sources)
    cap = model.cfg.final_logit_softcapping
    for step, frozen in enumerate(trajectory.steps):
        # pre-soft-cap logits of the real model (float64 hook values): float64 agreement
        torch.testing.assert_close(out.pre_logits[step], frozen.pre_logits, atol=1e-10, rtol=0)
        # the real model's logits themselves are float32 (the soft-capped unembedding is computed in fp32)
        capped = torch.tanh(out.pre_logits[step] / cap) * cap
        torch.testing.assert_close(capped.float(), frozen.logits, atol=1e-5, rtol=1e-5)
    # without the error nodes the replacement is another model: the check can fail
    zeroed = recorded_sources(trajectory, setup.transcoders)
    zeroed.errors = [[torch.zeros_like(e) for e in step] for step in zeroed.errors]
    assert (setup.rm.forward(zeroed).pre_logits[-1] - trajectory.steps[-1].pre_logits).abs().max() > 1e-3


def test_trajectory_replays_the_generation(setup):
    result = setup.model.generate(PROMPT, noise=ReplayNoise(0), progress=False, **OPTIONS)
    for step, frozen in enumerate(setup.trajectory.steps):
        assert torch.equal(frozen.canvas, result.trace[0].input_canvas[step][0].cpu())


def test_pruning_keeps_inputs_and_target_and_scores_are_fractions(setup):
    g = setup.graph
    pruned = g.prune(0.8, 0.98)
    assert pruned.n_nodes < g.n_nodes
    for kind in ("token", "prompt", "logit"):
        assert pruned.kind.count(kind) == g.kind.count(kind)
    assert 0 < g.replacement_score < 1 and 0 < g.completeness_score < 1
    full = g.prune(1.0, 1.0)
    assert full.kind.count("feature") > pruned.kind.count("feature")


def dense_reference_prune(graph: Graph, node_threshold: float, edge_threshold: float):
    """circuit-tracer's `prune_graph` and `compute_graph_scores` on the dense matrix, written from their
    definitions, against which the sparse implementation is checked."""
    dense = graph.dense()
    weights = graph.logit_weights()

    def normalize(matrix):
        return matrix.abs() / matrix.abs().sum(1, keepdim=True).clamp(min=1e-10)

    def influence(matrix):
        current, total = weights @ matrix, torch.zeros_like(weights)
        while current.any():
            total, current = total + current, current @ matrix
        return total

    def threshold(scores, fraction):
        ordered = torch.sort(scores.flatten(), descending=True).values
        cumulative = torch.cumsum(ordered, 0) / ordered.sum()
        return ordered[
            min(int(torch.searchsorted(cumulative, torch.tensor(fraction, dtype=cumulative.dtype))), len(ordered) - 1)
        ]

    node = influence(normalize(dense))
    inputs = torch.tensor([k in ("token", "prompt", "logit") for k in graph.kind])
    node_mask = (node >= threshold(node, node_threshold)) | inputs
    pruned = dense * node_mask[:, None] * node_mask[None, :]
    normalized = normalize(pruned)
    edge_scores = normalized * (influence(normalized) + weights)[:, None]
    # only nonzero entries are edges (at a threshold of exactly 1.0 circuit-tracer's dense mask also passes
    # the zeros, which would keep nodes that have no edge at all)
    edge_mask = (edge_scores >= threshold(edge_scores, edge_threshold)) & (pruned != 0)
    features = torch.tensor([k == "feature" for k in graph.kind])
    while True:
        before = node_mask.clone()
        edge_mask &= node_mask[:, None] & node_mask[None, :]
        node_mask &= inputs | edge_mask.any(0)
        node_mask &= ~features | edge_mask.any(1)
        if torch.equal(before, node_mask):
            break
    errors = torch.tensor([k == "error" for k in graph.kind])
    full = normalize(dense)
    output = influence(full) + weights
    completeness = float(((1 - full[:, errors].sum(1)) * output).sum() / output.sum())
    replacement = float(
        node[~errors & inputs & (weights == 0)].sum() / node[(~errors & inputs & (weights == 0)) | errors].sum()
    )
    return node_mask, edge_mask, completeness, replacement


@pytest.mark.parametrize(("node_threshold", "edge_threshold"), [(0.8, 0.98), (0.5, 0.9), (1.0, 1.0)])
def test_sparse_pruning_and_scores_equal_the_dense_definition(setup, node_threshold, edge_threshold):
    g = setup.graph
    node_mask, edge_mask, completeness, replacement = dense_reference_prune(g, node_threshold, edge_threshold)
    pruned = g.prune(node_threshold, edge_threshold)
    kept = node_mask.nonzero().flatten()
    assert pruned.n_nodes == len(kept)
    torch.testing.assert_close(pruned.dense(), (g.dense() * edge_mask)[kept][:, kept], atol=0, rtol=0)
    assert g.completeness_score == pytest.approx(completeness, rel=1e-9)
    assert g.replacement_score == pytest.approx(replacement, rel=1e-9)


def test_scores_match_circuit_tracers_definitions_on_a_hand_graph():
    # logit <- feature (3), logit <- error (1), feature <- token (2)
    kind = ["feature", "error", "token", "logit"]
    rows, cols, weights = [3, 3, 0], [0, 1, 2], [3.0, 1.0, 2.0]
    adjacency = torch.sparse_coo_tensor(
        torch.tensor([rows, cols]), torch.tensor(weights, dtype=torch.float64), (4, 4), check_invariants=True
    )
    minus = torch.full((4,), -1)
    zeros = torch.zeros(4, dtype=torch.float64)
    g = Graph(kind, minus, minus, minus, minus, minus, zeros, zeros, zeros, adjacency.coalesce())
    # influence: feature 0.75, error 0.25, token 0.75 → replacement 0.75 / (0.75 + 0.25)
    assert g.replacement_score == pytest.approx(0.75)
    # non-error fractions (logit 0.75, others 1) weighted by influence + logit weight (0.75, 0.25, 0.75, 1)
    assert g.completeness_score == pytest.approx(2.5 / 2.75)


def test_to_json_is_circuit_tracers_schema_with_steps(setup, tmp_path):
    path = setup.graph.to_json(tmp_path / "graph.json")
    document = json.loads(path.read_text())
    assert {"metadata", "nodes", "links"} <= set(document)
    ids = [node["node_id"] for node in document["nodes"]]
    assert len(ids) == len(set(ids))
    assert all("step" in node and "feature_type" in node and "layer" in node for node in document["nodes"])
    assert {link["source"] for link in document["links"]} <= set(ids)
    assert {link["target"] for link in document["links"]} <= set(ids)
    assert all(set(link) == {"source", "target", "weight"} for link in document["links"])
    influence = [node["influence"] for node in document["nodes"]]
    assert all(0 <= x <= 1 + 1e-9 for x in influence)
    # measured before pruning: the pruned file keeps the full graph's shares
    full = setup.graph.cumulative_scores()
    (logit,) = [node for node in document["nodes"] if node["kind"] == "logit"]
    assert logit["influence"] == pytest.approx(float(full[setup.graph.indices("logit")[0]]))
    steps = {node["step"] for node in document["nodes"] if node["kind"] == "token"}
    assert steps == {0, 1, 2, 3}


def test_transcoders_that_do_not_fit_are_refused(setup):
    two_layers = replace(CFG, num_hidden_layers=2, layer_types=("sliding_attention", "full_attention"))
    wrong_layers = random_transcoders(HookedDiffusionGemma.from_config(two_layers), 8)
    with pytest.raises(ValueError, match="has 2 transcoders but the model has 3 decoder layers"):
        attribute(setup.model, wrong_layers, PROMPT, TARGET, noise=ReplayNoise(0), **OPTIONS)
    wide = HookedDiffusionGemma.from_config(replace(CFG, hidden_size=32))
    with pytest.raises(ValueError, match="read width 32 but the model's hidden_size is 24"):
        attribute(setup.model, random_transcoders(wide, 8), PROMPT, TARGET, noise=ReplayNoise(0), **OPTIONS)


def test_transcoders_in_another_dtype_are_refused_naming_the_fix(setup):
    float32 = random_transcoders(setup.model, 8)
    with pytest.raises(ValueError, match=r"transcoders are torch.float32 on cpu but the model is torch.float64"):
        attribute_trajectory(setup.model, float32, setup.trajectory, TARGET)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (dict(position=2, step=4, token=3), r"target step 4 is outside the trajectory: it ran steps 0\.\.3"),
        (dict(position=2, step=-5, token=3), r"steps 0\.\.3 \(or -4\.\.-1"),
        (dict(position=5, step=0, token=3), r"target position 5 is outside the canvas: positions 0\.\.4"),
        (dict(position=0, step=0, token=99), r"not a token id in 0\.\.52"),
        (dict(position=0, step=0, token=2.0), r"target token 2.0 is not a token id"),
        (dict(position=0, step=0), r"target must be dict\(position=, step=, token=\)"),
    ],
)
def test_targets_outside_the_trajectory_name_the_valid_range(setup, target, message):
    with pytest.raises(ValueError, match=message):
        attribute_trajectory(setup.model, setup.transcoders, setup.trajectory, target)


def test_a_token_given_as_a_tensor_or_text_is_the_same_target(setup):
    as_tensor = dict(TARGET, token=(torch.tensor(4), torch.tensor([7])))
    graph = attribute_trajectory(setup.model, setup.transcoders, setup.trajectory, as_tensor, max_feature_nodes=5)
    assert graph.metadata["target"]["tokens"] == [[4, 1.0], [7, -1.0]]


def test_budget_and_threshold_limit_the_rows(setup):
    small = attribute_trajectory(setup.model, setup.transcoders, setup.trajectory, TARGET, max_feature_nodes=10)
    assert small.kind.count("feature") == 10
    # the ten chosen first are at the target's step (the sweep runs backwards from it)
    assert set(small.step[small.indices("feature")].tolist()) == {3}
    # rows kept are still exact
    dense = small.dense()
    rows = torch.cat((small.indices("feature"), small.indices("logit")))
    full_value = small.value[rows]
    # with fewer features, edges from dropped features are missing: the sum no longer reaches the value
    assert (dense[rows].sum(1) + small.bias[rows] - full_value).abs().max() > 1e-6


def test_small_row_chunks_and_a_host_stored_trajectory_give_the_same_graph(setup):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(norms_module, "COMPUTE_DTYPE", torch.float64)
        trajectory = record_trajectory(setup.model, PROMPT, noise=ReplayNoise(0), store_on="cpu", **OPTIONS)
    graph = attribute_trajectory(
        setup.model, setup.transcoders, trajectory, TARGET, max_feature_nodes=None, row_chunk=3
    )
    assert graph.kind == setup.graph.kind
    # row chunks regroup the same per-row sums: equal up to the order of float64 reductions
    torch.testing.assert_close(graph.dense(), setup.graph.dense(), atol=1e-12, rtol=0)


def test_a_later_canvas_reads_the_earlier_canvases_as_prompt_and_stays_exact(setup):
    options = dict(OPTIONS, max_new_tokens=2 * CFG.canvas_length, max_denoising_steps=3, eos_token_id=None)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(norms_module, "COMPUTE_DTYPE", torch.float64)
        trajectory = record_trajectory(setup.model, PROMPT, noise=ReplayNoise(0), canvas=1, **options)
        result = setup.model.generate(PROMPT, noise=ReplayNoise(0), progress=False, **options)
    graph = attribute_trajectory(
        setup.model, setup.transcoders, trajectory, dict(position=1, step=-1, token=3), max_feature_nodes=None
    )
    for step, frozen in enumerate(trajectory.steps):
        assert torch.equal(frozen.canvas, result.trace[1].input_canvas[step][0].cpu())
    prompt = graph.indices("prompt")
    assert len(prompt) == PROMPT.shape[1] + CFG.canvas_length
    assert graph.token[prompt].tolist() == result.sequences[0, : len(prompt)].tolist()
    dense = graph.dense()
    rows = torch.cat((graph.indices("feature"), graph.indices("logit")))
    torch.testing.assert_close(dense[rows].sum(1) + graph.bias[rows], graph.value[rows], atol=ATOL, rtol=0)


@pytest.mark.parametrize("density", [0.03, 0.5], ids=["sparse path", "dense path"])
def test_active_feature_edges_are_activation_times_cotangent_dot_decoder_row(density):
    g = torch.Generator().manual_seed(0)
    rows, length, width, d_model = 7, 5, 64, 6
    cot = torch.randn(rows, length, d_model, generator=g, dtype=torch.float64)
    W_dec = torch.randn(width, d_model, generator=g, dtype=torch.float64)
    acts = torch.rand(length, width, generator=g, dtype=torch.float64)
    acts = acts * (torch.rand(length, width, generator=g) < density)
    positions, features = acts.nonzero(as_tuple=True)
    edges = active_feature_edges(cot, W_dec, positions, features, acts[positions, features])
    expected = torch.einsum("rad,ad->ra", cot[:, positions], W_dec[features]) * acts[positions, features]
    torch.testing.assert_close(edges, expected, atol=1e-12, rtol=0)
