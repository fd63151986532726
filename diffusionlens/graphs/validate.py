"""Checking an attribution graph against the model by intervention: does ablating a graph feature move the
target as the graph says?

The graph's edges are direct effects in the replacement model, activation included. Ablating feature j (its
activation a_j to 0) changes the target there by minus its **total effect** `total_effects(graph)[j]`, the
signed sum over paths j → … → target of the edge products, each intermediate feature i passing on its
change with slope 1 (an active JumpReLU feature's activation is its pre-activation), so a path's weight is
`A[t, i_k] (1/a_{i_k}) A[i_k, …] … A[i_1, j]`. This holds exactly in the replacement model with every other
feature's gate (active or not) frozen at the recorded run (`replacement_target_changes(..., response="linear")`),
for a graph with every influential feature as a row (`max_feature_nodes=None`); the **direct effect**
(`A[target, j]`) is the same change with every other feature held at its recorded activation
(`response="fixed"`). The real model differs in three ways the graph cannot see: downstream features cross
their thresholds, error terms respond (the real feed-forward blocks are not linear), and attention patterns,
norms and self-conditioning move. `RecordedRun` measures the real change: the trajectory replayed step by step
with the recorded canvases (the graph's token sources) and the self-conditioning recomputed, the feature set
through `intervention_hooks` (the transcoder spliced with its error term at that one step and layer, so nothing
else changes). `intervention_agreement` puts the two side by side for the graph's top features and for as many
random active features at the same steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int

from diffusionlens.graphs.attribution import GRAPH_OPTIONS, attributed_trajectory, run_options
from diffusionlens.graphs.graph import Graph
from diffusionlens.graphs.replacement import ReplacementModel, Sources, recorded_sources
from diffusionlens.graphs.splicing import FeatureIntervention, intervention_hooks
from diffusionlens.graphs.trajectory import Trajectory
from diffusionlens.sampling.recorded import encode_prompt, rerun_recorded_pass

if TYPE_CHECKING:
    from diffusionlens.graphs.transcoders import TranscoderSet
    from diffusionlens.model import HookedDiffusionGemma

#: How the other features answer an edit in `replacement_target_changes`: held at their recorded activations
#: (the direct effect), passing changes on with their gates frozen (the total effect), or through JumpReLU.
RESPONSES = ("fixed", "linear", "jumprelu")
#: Ways to rank a graph's features for checking.
RANKINGS = ("influence", "total", "direct")
#: `check_graph`'s own keywords, which `intervention_agreement` hands to it.
CHECK_OPTIONS = ("top_n", "rank_by", "steps", "steer", "n_random", "seed")


def graph_target(graph: Graph) -> tuple[int, int, list[tuple[int, float]]]:
    """(step, position, [(token, sign), ...]) of the graph's target logit."""
    target = graph.metadata["target"]
    return int(target["step"]), int(target["position"]), [(int(t), float(s)) for t, s in target["tokens"]]


def direct_effects(graph: Graph) -> Float[torch.Tensor, " node"]:
    """Each node's edge into the target logit (0 where none): its direct effect, activation included."""
    dense_row = torch.zeros(graph.n_nodes, dtype=graph.value.dtype)
    targets, sources, weights = graph.edges()
    logit = int(graph.indices("logit")[0])
    at_logit = targets == logit
    return dense_row.index_add_(0, sources[at_logit], weights[at_logit])


def total_effects(graph: Graph) -> Float[torch.Tensor, " node"]:
    """Each node's signed total effect on the target: the sum over paths of its edges' products, each feature
    on the way passing a change of its pre-activation on one for one (divided by its activation, which its
    outgoing edges include). Ablating feature j changes the target by `-total_effects(graph)[j]` in the
    replacement model with every gate frozen (see the module docstring); 0 for nodes with no path."""
    targets, sources, weights = graph.edges()
    is_feature = torch.tensor([k == "feature" for k in graph.kind])
    activation = torch.where(is_feature, graph.activation, torch.ones_like(graph.activation))
    gradient = torch.zeros(graph.n_nodes, dtype=weights.dtype)
    gradient[graph.indices("logit")] = 1.0  # d target / d (a row's pre-activation), paths of the current length
    total = torch.zeros_like(gradient)
    for _ in range(graph.n_nodes + 1):
        contribution = torch.zeros_like(gradient).index_add_(0, sources, weights * gradient[targets])
        if not contribution.any():
            return total
        total += contribution
        gradient = torch.where(is_feature, contribution / activation, torch.zeros_like(contribution))
    raise RuntimeError("total effects did not converge: the adjacency has a cycle")


def replacement_target_changes(
    replacement: ReplacementModel,
    sources: Sources,
    target: tuple[int, int, list[tuple[int, float]]],
    edits: list[list[FeatureIntervention]],
    response: str = "linear",
) -> list[float]:
    """For each list of interventions in `edits`, the change of the target (pre-soft-cap logit or difference)
    in the replacement model when they set their features, the other features answering as `response` says
    (see `RESPONSES`); error nodes, canvas tokens and the prompt stay at the recorded run."""
    if response not in RESPONSES:
        raise ValueError(f"response must be one of {RESPONSES}, got {response!r}")
    step, position, tokens = target
    entering: list[torch.Tensor | None] = []  # the clean run's logits handed to each step: edits start there

    def value(interventions: list[FeatureIntervention]) -> float:
        first = min((i.step for i in interventions), default=0)
        logits = _replacement_pre_logits(
            replacement, sources, range(first, step + 1), entering[first] if entering else None, interventions, response
        )
        return float(sum(sign * logits[position, t] for t, sign in tokens))

    with torch.no_grad():
        logits = _replacement_pre_logits(replacement, sources, range(step + 1), None, [], response, entering)
        clean = float(sum(sign * logits[position, t] for t, sign in tokens))
        return [value(interventions) - clean for interventions in edits]


def _replacement_pre_logits(
    replacement: ReplacementModel,
    sources: Sources,
    steps: range,
    previous: torch.Tensor | None,
    interventions: list[FeatureIntervention],
    response: str,
    entering: list | None = None,
) -> torch.Tensor:
    """The last step's pre-soft-cap logits of `ReplacementModel.forward` run over `steps` (`previous`: the
    logits handed to the first), the features recomputed from their pre-activations as `response` says and
    the interventions applied. `entering`, if given, collects the logits handed to each step."""
    decoder = replacement.model.decoder
    for step in steps:
        if entering is not None:
            entering.append(previous)
        frozen = replacement.frozen(step)
        device = frozen.post_norm_scale.device
        prompt = sources.prompt.to(device)
        resid = (sources.token_embed[step].to(device) + replacement.self_conditioning(step, previous)) * (
            frozen.post_norm_scale
        )
        for layer, frozen_layer in enumerate(frozen.layers):
            block, transcoder = decoder.blocks[layer], replacement.transcoders[layer]
            resid = resid + replacement.attention(layer, frozen_layer, resid, prompt)
            recorded = sources.acts[step][layer].to(device)
            if response == "fixed":
                acts = recorded.clone()
            else:
                pre = transcoder.pre_activation(resid * frozen_layer.ln2_scale * block.ln2.weight)
                acts = pre * (recorded > 0).to(pre.dtype) if response == "linear" else transcoder.activation(pre)
            for edit in interventions:
                if (edit.step, edit.layer) == (step, layer):
                    acts[edit.position, edit.feature] = edit.value
            ffn = transcoder.decode(acts) + sources.errors[step][layer].to(device)
            resid = (resid + ffn) * block.layer_scalar
        previous = (resid * frozen.final_scale * decoder.ln_final.weight) @ decoder.embed.W_E.T
    return previous


class RecordedRun:
    """The real model on one recorded trajectory, replayed step by step: each step reads its recorded canvas
    (the graph's token sources) and the self-conditioning the replay computes, so an edit at step s reaches
    later steps through what step s hands on, as in the graph. `target_change(interventions)` is the change of
    the target's pre-soft-cap logit (or difference) they cause."""

    def __init__(
        self,
        model: HookedDiffusionGemma,
        transcoders: TranscoderSet,
        input_ids: Int[torch.Tensor, "1 prompt"],
        trajectory: Trajectory,
        target: tuple[int, int, list[tuple[int, float]]],
        *,
        noise: Any = None,
        **generate_options: Any,
    ) -> None:
        self.model, self.transcoders, self.target = model, transcoders, target
        self.canvas = trajectory.canvas_index
        self.temperatures = [step.temperature for step in trajectory.steps]
        input_ids = input_ids.to(model.device)
        attention_mask = generate_options.pop("attention_mask", None)
        options = {"progress": False, **generate_options}
        with torch.no_grad():
            result = model.generate(input_ids, noise=noise, attention_mask=attention_mask, **options)
        self.trace = result.trace
        replayed = [self.trace[self.canvas].input_canvas[s][0].cpu() for s in range(trajectory.n_steps)]
        if any(not torch.equal(r, s.canvas) for r, s in zip(replayed, trajectory.steps, strict=False)):
            raise ValueError("the run did not replay the recorded trajectory: pass the same noise and options")
        try:
            with torch.no_grad():
                self.state = encode_prompt(model, input_ids, attention_mask, result.sequences, self.canvas)
                self.self_cond_in: list[torch.Tensor | None] = [None]
                for step in range(target[0]):
                    previous = self.self_cond_in[step]
                    raw = rerun_recorded_pass(model, self.trace, self.state, previous, canvas=self.canvas, step=step)
                    self.self_cond_in.append(raw / self.temperatures[step])
        finally:
            model.hook_ctx.reset()
        self.clean = self.target_value([])
        recorded = trajectory.steps[target[0]].pre_logits[target[1]]
        #: |replayed clean target - the recorded run's|: 0 unless the replay differs from the recording
        self.replay_gap = abs(self.clean - float(sum(sign * recorded[t] for t, sign in target[2])))

    def target_value(self, interventions: list[FeatureIntervention]) -> float:
        """The target after the interventions (none: the clean run)."""
        model, (target_step, position, tokens) = self.model, self.target
        late = [i for i in interventions if not 0 <= i.step <= target_step]
        if late:
            raise ValueError(f"interventions {late} are not at steps 0..{target_step} (the target's step and before)")
        first = min((i.step for i in interventions), default=target_step)
        hooks = intervention_hooks(self.transcoders, interventions) if interventions else []
        captured: list[torch.Tensor] = []

        def keep_final(normalized: torch.Tensor, hook: Any) -> torch.Tensor:
            if hook.ctx.step == target_step:
                captured.append(normalized[0, position].detach())
            return normalized

        hooks = [*hooks, ("decoder.ln_final.hook_normalized", keep_final)]
        self_cond = self.self_cond_in[first]
        try:
            with torch.no_grad(), model.hooks_for_run(fwd_hooks=hooks):
                for step in range(first, target_step + 1):
                    raw = rerun_recorded_pass(model, self.trace, self.state, self_cond, canvas=self.canvas, step=step)
                    self_cond = raw / self.temperatures[step]
        finally:
            model.hook_ctx.reset()
        logits = captured[-1] @ model.decoder.embed.W_E.detach().T
        return float(sum(sign * logits[t] for t, sign in tokens))

    def target_change(self, interventions: list[FeatureIntervention]) -> float:
        return self.target_value(interventions) - self.clean


@dataclass
class NodeEffect:
    """One feature checked: where it is, its activation, the graph's numbers (circuit-tracer influence,
    direct and total effect; NaN for a feature not in the graph), the ablation's change of the target in the
    replacement model (JumpReLU features, frozen errors) and in the real model, and, when steering was asked
    for, the steered feature's predicted and measured change."""

    step: int
    layer: int
    position: int
    feature: int
    activation: float
    influence: float = math.nan
    direct: float = math.nan
    total: float = math.nan
    replacement: float = math.nan
    measured: float = math.nan
    steer_predicted: float = math.nan
    steer_measured: float = math.nan

    @property
    def predicted(self) -> float:
        """The graph's prediction for the ablation: minus the total effect."""
        return -self.total


@dataclass
class InterventionAgreement:
    """`nodes`: the graph's top features, checked; `random`: as many random active features at the same
    steps, ablated; `summary`: correlations and mean effects (see `intervention_agreement`)."""

    nodes: list[NodeEffect]
    random: list[NodeEffect]
    summary: dict
    graph: Graph = field(repr=False)

    def table(self) -> str:
        """The per-feature table, top features then random ones: the ablation's change predicted from the
        direct and the total effect, in the replacement model (repl) and in the real model, and steering's."""
        header = (
            f"{'':6} {'step':>4} {'layer':>5} {'pos':>4} {'feat':>5} {'act':>7} {'infl':>6} {'-direct':>8} "
            f"{'-total':>8} {'repl':>8} {'real':>8} {'steer pr':>8} {'steer re':>8}"
        )
        lines = [header]
        for label, rows in (("top", self.nodes), ("random", self.random)):
            for n in rows:
                lines.append(
                    f"{label:6} {n.step:4d} {n.layer:5d} {n.position:4d} {n.feature:5d} {n.activation:7.3f} "
                    f"{n.influence:6.3f} {-n.direct:8.4f} {n.predicted:8.4f} {n.replacement:8.4f} "
                    f"{n.measured:8.4f} {n.steer_predicted:8.4f} {n.steer_measured:8.4f}"
                )
        return "\n".join(lines)


def pearson(x: Float[torch.Tensor, " n"], y: Float[torch.Tensor, " n"]) -> float:
    """Pearson correlation (NaN for fewer than 2 points or a constant side)."""
    x, y = x.double(), y.double()
    if len(x) < 2:
        return math.nan
    x, y = x - x.mean(), y - y.mean()
    scale = (x.norm() * y.norm()).item()
    return float((x @ y) / scale) if scale > 0 else math.nan


def ranks(x: Float[torch.Tensor, " n"]) -> Float[torch.Tensor, " n"]:
    """Ranks from 0, ties sharing their mean rank."""
    x = x.double()
    order = torch.argsort(x)
    result = torch.empty_like(x)
    result[order] = torch.arange(len(x), dtype=x.dtype)
    for value in torch.unique(x):
        tied = x == value
        result[tied] = result[tied].mean()
    return result


def spearman(x: Float[torch.Tensor, " n"], y: Float[torch.Tensor, " n"]) -> float:
    """Spearman rank correlation (Pearson of the ranks, ties averaged)."""
    return pearson(ranks(x), ranks(y))


def intervention_agreement(
    model: HookedDiffusionGemma,
    transcoders: TranscoderSet,
    input_ids: Int[torch.Tensor, "1 prompt"],
    target: dict,
    *,
    max_feature_nodes: int | None = 1024,
    **options: Any,
) -> InterventionAgreement:
    """Build the graph of `target` as `attribute` does (its keywords: `noise`, `canvas`, `min_influence`, …, and
    `generate`'s), then check its top features on the model by intervention (`check_graph`, which takes `top_n`,
    `rank_by`, `steps`, `steer`, `n_random`, `seed`)."""
    checks = {k: options.pop(k) for k in CHECK_OPTIONS if k in options}
    graph_options = {k: options.pop(k) for k in GRAPH_OPTIONS if k in options}
    graph_options["max_feature_nodes"] = max_feature_nodes
    graph, trajectory = attributed_trajectory(model, transcoders, input_ids, target, graph_options, options)
    return check_graph(model, transcoders, input_ids, trajectory, graph, **checks, **run_options(options))


def check_graph(
    model: HookedDiffusionGemma,
    transcoders: TranscoderSet,
    input_ids: Int[torch.Tensor, "1 prompt"],
    trajectory: Trajectory,
    graph: Graph,
    *,
    noise: Any = None,
    top_n: int = 10,
    rank_by: str = "influence",
    steps: list[int] | None = None,
    steer: float | None = 2.0,
    n_random: int | None = None,
    seed: int = 0,
    **generate_options: Any,
) -> InterventionAgreement:
    """Check `graph` (of `trajectory`, recorded from `input_ids` with `noise` and `generate_options`) on the
    real model: its `top_n` features by `rank_by` (`"influence"`: circuit-tracer's node influence; `"total"` or
    `"direct"`: |effect|), among those at `steps` (default: any; a step-1 target's features at `[0]` are its
    cross-step ones), are each ablated (set to 0) and, with `steer`, set to `steer` × their activation,
    at their step, layer and position (`intervention_hooks`), and the target's change is set against the
    graph's prediction (minus the total effect; (steer - 1) × the total effect). `n_random` (default `top_n`)
    random active features, each at the step of a top feature in turn (seeded by `seed`), are ablated for
    scale. The summary holds Pearson and Spearman correlations of predicted and measured changes (total and
    direct effect), the sign agreement, mean |change| of top and random features, and the same checks in the
    replacement model with JumpReLU features (what the graph's linearity leaves out before the real model)."""
    if rank_by not in RANKINGS:
        raise ValueError(f"rank_by must be one of {RANKINGS}, got {rank_by!r}")
    target = graph_target(graph)
    features = graph.indices("feature")
    if not len(features):
        raise ValueError("the graph has no feature nodes to check: is max_feature_nodes 0?")
    if steps is not None:
        features = features[torch.isin(graph.step[features], torch.tensor(list(steps), dtype=torch.long))]
        if not len(features):
            raise ValueError(f"the graph has no feature nodes at steps {list(steps)}")
    direct, total = direct_effects(graph), total_effects(graph)
    influence = graph.node_influence()
    score = {"influence": influence, "total": total.abs(), "direct": direct.abs()}[rank_by][features]
    top = features[torch.argsort(score, descending=True)[:top_n]].tolist()
    run = RecordedRun(model, transcoders, input_ids, trajectory, target, noise=noise, **generate_options)
    replacement = ReplacementModel(model, transcoders, trajectory)
    sources = recorded_sources(trajectory, transcoders)
    nodes = []
    for i in top:
        node = NodeEffect(
            *(int(t[i]) for t in (graph.step, graph.layer, graph.position, graph.feature)),
            activation=float(graph.activation[i]),
            influence=float(influence[i]),
            direct=float(direct[i]),
            total=float(total[i]),
        )
        ablate = [FeatureIntervention(node.step, node.layer, node.position, node.feature, 0.0)]
        node.measured = run.target_change(ablate)
        (node.replacement,) = replacement_target_changes(replacement, sources, target, [ablate], "jumprelu")
        if steer is not None:
            steered = [FeatureIntervention(node.step, node.layer, node.position, node.feature, steer * node.activation)]
            node.steer_measured = run.target_change(steered)
            node.steer_predicted = (steer - 1.0) * node.total
        nodes.append(node)
    random = _random_features(sources, [n.step for n in nodes], n_random, seed, {_site(n) for n in nodes})
    for node in random:
        node.measured = run.target_change([FeatureIntervention(*_site(node), 0.0)])
    summary = _summary(nodes, random, run, graph)
    summary["rank_by"], summary["steps"], summary["steer"] = rank_by, steps, steer
    return InterventionAgreement(nodes, random, summary, graph)


def _site(node: NodeEffect) -> tuple[int, int, int, int]:
    return node.step, node.layer, node.position, node.feature


def _random_features(
    sources: Sources, steps: list[int], n_random: int | None, seed: int, exclude: set[tuple[int, int, int, int]]
) -> list[NodeEffect]:
    """`n_random` (default: one per step in `steps`) active features drawn uniformly at the steps of `steps`
    in turn, none in `exclude` and none twice."""
    generator = torch.Generator().manual_seed(seed)
    count = len(steps) if n_random is None else n_random
    chosen: list[NodeEffect] = []
    taken = set(exclude)
    for k in range(count):
        step = steps[k % len(steps)]
        active = [(layer, *site) for layer, acts in enumerate(sources.acts[step]) for site in acts.nonzero().tolist()]
        free = [site for site in active if (step, *site) not in taken]
        if not free:
            continue
        layer, position, feature = free[int(torch.randint(len(free), (1,), generator=generator))]
        taken.add((step, layer, position, feature))
        chosen.append(NodeEffect(step, layer, position, feature, float(sources.acts[step][layer][position, feature])))
    return chosen


def _summary(nodes: list[NodeEffect], random: list[NodeEffect], run: RecordedRun, graph: Graph) -> dict:
    def column(rows: list[NodeEffect], name: str) -> torch.Tensor:
        return torch.tensor([getattr(n, name) for n in rows], dtype=torch.float64)

    measured, predicted = column(nodes, "measured"), column(nodes, "predicted")
    direct, replaced = -column(nodes, "direct"), column(nodes, "replacement")
    target_step = graph_target(graph)[0]
    nonzero = (measured != 0) & (predicted != 0)
    summary = {
        "target_step": target_step,
        "target_value": run.clean,
        "replay_gap": run.replay_gap,
        "n_top": len(nodes),
        "n_top_earlier_steps": sum(n.step < target_step for n in nodes),
        "pearson_total": pearson(predicted, measured),
        "spearman_total": spearman(predicted, measured),
        "pearson_direct": pearson(direct, measured),
        "spearman_direct": spearman(direct, measured),
        "sign_agreement": float((torch.sign(predicted) == torch.sign(measured))[nonzero].double().mean())
        if nonzero.any()
        else math.nan,
        # least squares through 0 of measured on predicted: 1 when the graph gets the amount right
        "slope_total": float((predicted @ measured) / (predicted @ predicted)) if predicted.any() else math.nan,
        "pearson_total_vs_replacement": pearson(predicted, replaced),
        "pearson_replacement_vs_real": pearson(replaced, measured),
        "mean_abs_predicted_top": float(predicted.abs().mean()),
        "mean_abs_measured_top": float(measured.abs().mean()),
        "n_random": len(random),
        "mean_abs_measured_random": float(column(random, "measured").abs().mean()) if random else math.nan,
        "replacement_score": graph.replacement_score,
        "completeness_score": graph.completeness_score,
    }
    if not math.isnan(nodes[0].steer_measured):
        steer_measured, steer_predicted = column(nodes, "steer_measured"), column(nodes, "steer_predicted")
        summary["pearson_steer"] = pearson(steer_predicted, steer_measured)
        summary["spearman_steer"] = spearman(steer_predicted, steer_measured)
    return summary
