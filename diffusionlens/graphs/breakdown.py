"""Where an attribution graph's target comes from, step by step: its value split over source steps and channels.

Every row of a graph is affine in its sources: `value = bias + incoming edges`, and an active JumpReLU feature's
activation is its pre-activation, so a feature passes a change of its pre-activation on one for one. Unrolling
every feature into its own incoming edges and bias writes the target exactly as

    target = target bias + sum over source nodes (tokens, prompt, errors) of their total effect
                         + sum over features of (their bias × their total effect / their activation)

(`total_effects`: the sum over paths of edge products, see `diffusionlens.graphs.validate`). Each term belongs
to one node, so the terms can be grouped by the node's step and kind without overlap: `node_contributions`
gives them, `step_breakdown` sums them per (step, kind) next to circuit-tracer's node influence, and
`channel_breakdown` sums them per channel into the target's step: what earlier steps hand on through
self-conditioning, the canvas tokens the target's step reads, that step's own error nodes and feature biases,
the prompt and the target's bias. The terms add up to the target's value for a graph that kept every
influential feature (`max_feature_nodes=None`); features left out by a budget take their share with them, and
`unattributed` says how much.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float

from diffusionlens.graphs.graph import Graph
from diffusionlens.graphs.validate import graph_target, total_effects

#: Channels into the target's step, in the order `channel_breakdown` reports them.
CHANNELS = (
    "earlier steps (self-conditioning)",
    "canvas tokens at the target step",
    "target step: error nodes",
    "target step: feature biases",
    "prompt",
    "target bias",
)


def node_contributions(graph: Graph) -> Float[torch.Tensor, " node"]:
    """Each node's additive share of the target's value (see the module docstring): a source node's total
    effect, a feature's bias times its total effect per unit of activation, the logit's own bias."""
    total = total_effects(graph)
    contribution = total.clone()
    features = graph.indices("feature")
    contribution[features] = graph.bias[features] * total[features] / graph.activation[features]
    logit = graph.indices("logit")
    contribution[logit] = graph.bias[logit]
    return contribution


def target_value(graph: Graph) -> float:
    """The target's value (pre-soft-cap logit or logit difference) in the replacement model."""
    return float(graph.value[graph.indices("logit")[0]])


@dataclass
class StepRow:
    """Nodes of one kind at one step: how many, their summed share of the target (`contribution`, signed,
    additive over rows), and their summed circuit-tracer influence (unsigned; over source kinds the shares
    sum to 1, over features paths are counted at every feature they pass)."""

    step: int
    kind: str
    n_nodes: int
    contribution: float
    influence: float


@dataclass
class Breakdown:
    """Rows (per step and kind, or per channel), the target's value, and what the rows leave unattributed
    (the value minus their sum: 0 up to rounding for a graph with every influential feature)."""

    rows: list
    target: float

    @property
    def attributed(self) -> float:
        return sum(row.contribution for row in self.rows)

    @property
    def unattributed(self) -> float:
        return self.target - self.attributed


def step_breakdown(graph: Graph) -> Breakdown:
    """The target split by the step and kind of the node each term belongs to (prompt tokens at step -1,
    the target logit's bias at its own step), steps ascending, kinds in graph order."""
    contribution = node_contributions(graph)
    node_influence = graph.node_influence()
    groups: dict[tuple[int, str], list[int]] = {}
    for index, kind in enumerate(graph.kind):
        groups.setdefault((int(graph.step[index]), kind), []).append(index)
    order = {kind: rank for rank, kind in enumerate(("feature", "error", "token", "prompt", "logit"))}
    rows = []
    for (step, kind), members in sorted(groups.items(), key=lambda item: (item[0][0], order[item[0][1]])):
        pick = torch.tensor(members, dtype=torch.long)
        rows.append(
            StepRow(step, kind, len(members), float(contribution[pick].sum()), float(node_influence[pick].sum()))
        )
    return Breakdown(rows, target_value(graph))


@dataclass
class ChannelRow:
    """One channel into the target's step (see `CHANNELS`): its nodes' summed share of the target."""

    channel: str
    n_nodes: int
    contribution: float
    influence: float


def node_channels(graph: Graph) -> list[str]:
    """The channel (one of `CHANNELS`) each node's term reaches the target's step through."""
    target_step = graph_target(graph)[0]
    channels = []
    for index, kind in enumerate(graph.kind):
        step = int(graph.step[index])
        if kind == "prompt":
            channels.append(CHANNELS[4])
        elif kind == "logit":
            channels.append(CHANNELS[5])
        elif step < target_step:  # a step's only way into a later one is what it hands on: self-conditioning
            channels.append(CHANNELS[0])
        elif kind == "token":
            channels.append(CHANNELS[1])
        else:
            channels.append(CHANNELS[2] if kind == "error" else CHANNELS[3])
    return channels


def channel_breakdown(graph: Graph) -> Breakdown:
    """The target split by channel (`CHANNELS`): the terms of earlier steps' nodes (features, errors, canvas
    tokens), which reach the target's step only through self-conditioning, against the canvas tokens, error
    nodes and feature biases of the target's own step, the prompt and the target's bias."""
    contribution = node_contributions(graph)
    node_influence = graph.node_influence()
    channels = node_channels(graph)
    rows = []
    for channel in CHANNELS:
        pick = torch.tensor([i for i, c in enumerate(channels) if c == channel], dtype=torch.long)
        rows.append(ChannelRow(channel, len(pick), float(contribution[pick].sum()), float(node_influence[pick].sum())))
    return Breakdown(rows, target_value(graph))
