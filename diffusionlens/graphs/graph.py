"""An attribution graph across denoising steps: nodes, a sparse adjacency, pruning, scores and the JSON file.

Nodes come in circuit-tracer's order: transcoder features, error nodes, input nodes (each step's canvas
tokens, then the prompt's tokens), and the target logit last. `adjacency[target, source]` is the direct
effect of the source on the target in the replacement model, activation included, so a node's incoming
edges plus its `bias` sum to its pre-activation (`value`). Pruning, `replacement_score` and
`completeness_score` follow circuit-tracer's `prune_graph` and `compute_graph_scores`: influence is the sum
over paths of products of row-normalised absolute edge weights, seeded at the target logit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from jaxtyping import Bool, Float, Int

#: Node kinds, in the order nodes are stored.
KINDS = ("feature", "error", "token", "prompt", "logit")


@dataclass
class Graph:
    """kind: one of KINDS per node; step (-1 for prompt tokens, which precede every step), layer (-1 where
    none), position (canvas position; prompt position for prompt tokens), feature (-1 where none), token
    (the token id of token, prompt and logit nodes, -1 elsewhere); activation: a feature's activation (NaN
    elsewhere); value: a feature's or the logit's pre-activation in the replacement model; bias: what is not
    an edge of it (0 for sources). metadata: prompt, target, settings, the trajectory's canvases."""

    kind: list[str]
    step: Int[torch.Tensor, " node"]
    layer: Int[torch.Tensor, " node"]
    position: Int[torch.Tensor, " node"]
    feature: Int[torch.Tensor, " node"]
    token: Int[torch.Tensor, " node"]
    activation: Float[torch.Tensor, " node"]
    value: Float[torch.Tensor, " node"]
    bias: Float[torch.Tensor, " node"]
    adjacency: torch.Tensor  # sparse COO [node (target), node (source)]
    metadata: dict = field(default_factory=dict)
    #: circuit-tracer's node `influence` in the file: the share of total influence carried by the nodes at
    #: least as influential as this one, measured on the graph before pruning (None: measure on this one).
    cumulative_influence: Float[torch.Tensor, " node"] | None = None

    @property
    def n_nodes(self) -> int:
        return len(self.kind)

    def indices(self, kind: str) -> Int[torch.Tensor, " n"]:
        if kind not in KINDS:
            raise ValueError(f"unknown node kind {kind!r}; choose one of {KINDS}")
        return torch.tensor([i for i, k in enumerate(self.kind) if k == kind], dtype=torch.long)

    def dense(self) -> Float[torch.Tensor, "node node"]:
        return self.adjacency.to_dense()

    def logit_weights(self) -> Float[torch.Tensor, " node"]:
        weights = torch.zeros(self.n_nodes, dtype=self.value.dtype)
        weights[self.indices("logit")] = 1.0
        return weights

    def edges(self) -> tuple[Int[torch.Tensor, " edge"], Int[torch.Tensor, " edge"], Float[torch.Tensor, " edge"]]:
        """(targets, sources, weights) of every edge."""
        adjacency = self.adjacency.coalesce()
        targets, sources = adjacency.indices()
        return targets, sources, adjacency.values()

    def node_influence(self) -> Float[torch.Tensor, " node"]:
        """Each node's total influence on the target (circuit-tracer's `compute_node_influence`)."""
        targets, sources, weights = self.edges()
        normalized = normalize_rows(targets, weights, self.n_nodes)
        return influence(targets, sources, normalized, self.logit_weights())

    @property
    def replacement_score(self) -> float:
        """Share of the target's influence that reaches it from input nodes (tokens, prompt) rather than
        error nodes, as circuit-tracer's `compute_graph_scores`."""
        node = self.node_influence()
        inputs = node[self.indices("token")].sum() + node[self.indices("prompt")].sum()
        errors = node[self.indices("error")].sum()
        return float(inputs / (inputs + errors).clamp(min=1e-30))

    @property
    def completeness_score(self) -> float:
        """Influence-weighted share of every node's incoming (normalised) weight not from error nodes."""
        targets, sources, weights = self.edges()
        normalized = normalize_rows(targets, weights, self.n_nodes)
        logit_weights = self.logit_weights()
        node = influence(targets, sources, normalized, logit_weights)
        from_error = torch.tensor([k == "error" for k in self.kind])[sources]
        error_share = torch.zeros(self.n_nodes, dtype=normalized.dtype).index_add_(
            0, targets[from_error], normalized[from_error]
        )
        output = node + logit_weights
        return float(((1 - error_share) * output).sum() / output.sum())

    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Graph:
        """The subgraph circuit-tracer's `prune_graph` keeps: nodes carrying `node_threshold` of the total
        influence and edges carrying `edge_threshold`, then nodes without outgoing (or, for features,
        incoming) kept edges dropped, repeatedly. Input and logit nodes always stay."""
        node_mask, edge_mask = prune_masks(self, node_threshold, edge_threshold)
        cumulative = self.cumulative_scores()
        keep = node_mask.nonzero().flatten()
        new_index = torch.cumsum(node_mask.long(), 0) - 1
        targets, sources, weights = self.edges()
        indices = torch.stack((new_index[targets[edge_mask]], new_index[sources[edge_mask]]))
        size = (len(keep), len(keep))
        adjacency = torch.sparse_coo_tensor(indices, weights[edge_mask], size, check_invariants=True).coalesce()
        pick = keep.tolist()
        meta = {**self.metadata, "node_threshold": node_threshold, "edge_threshold": edge_threshold}
        return replace(
            self,
            kind=[self.kind[i] for i in pick],
            **{name: getattr(self, name)[keep] for name in _NODE_TENSORS},
            adjacency=adjacency,
            metadata=meta,
            cumulative_influence=cumulative[keep],
        )

    def cumulative_scores(self) -> Float[torch.Tensor, " node"]:
        """For each node, the share of the total influence carried by the nodes at least as influential
        (circuit-tracer's `cumulative_scores`, what its graph files call a node's influence)."""
        if self.cumulative_influence is not None:
            return self.cumulative_influence
        node = self.node_influence()
        ordered, order = torch.sort(node, descending=True)
        cumulative = torch.zeros_like(node)
        cumulative[order] = torch.cumsum(ordered, 0) / ordered.sum().clamp(min=1e-30)
        return cumulative

    # ------------------------------------------------------------------ circuit-tracer's file
    def to_json(self, path: str | Path, *, node_threshold: float | None = 0.8, edge_threshold: float = 0.98) -> Path:
        """Write the graph in circuit-tracer's graph-file schema (`metadata`, `qParams`, `nodes` with
        `node_id`, `links` with `source`, `target`, `weight`), pruned with the thresholds first (pass
        `node_threshold=None` to write every node). Every node also carries `step`, `kind` and `position`
        (token, prompt and logit nodes their `token` id). Its context index `ctx_idx` runs over the prompt,
        then step 0's canvas, step 1's, ...: steps are columns in circuit-tracer's frontend."""
        document = self.json_document(node_threshold=node_threshold, edge_threshold=edge_threshold)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, indent=1))
        return path

    def json_document(self, *, node_threshold: float | None = 0.8, edge_threshold: float = 0.98) -> dict:
        """What `to_json` writes, as a dict (the HTML graph view reads it: `viz.graph_view`)."""
        graph = self if node_threshold is None else self.prune(node_threshold, edge_threshold)
        cumulative = graph.cumulative_scores().tolist()
        nodes = [{**graph.node_json(i), "influence": cumulative[i]} for i in range(graph.n_nodes)]
        adjacency = graph.adjacency.coalesce()
        targets, sources = adjacency.indices().tolist()
        links = [
            {"source": nodes[s]["node_id"], "target": nodes[t]["node_id"], "weight": w}
            for t, s, w in zip(targets, sources, adjacency.values().tolist(), strict=True)
        ]
        meta = graph.metadata
        return {
            "metadata": {
                "slug": meta.get("slug", "diffusionlens-graph"),
                "scan": meta.get("scan", "diffusionlens"),
                "transcoder_list": [],
                "prompt_tokens": meta.get("context_tokens", []),
                "prompt": meta.get("prompt", ""),
                "node_threshold": node_threshold,
                "diffusionlens": {k: v for k, v in meta.items() if k not in ("context_tokens",)},
            },
            "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
            "nodes": nodes,
            "links": links,
        }

    def node_json(self, i: int) -> dict:
        """One node as circuit-tracer's frontend reads it, plus `step`, `kind`, `position` and (for token,
        prompt and logit nodes) `token`, the token id."""
        kind, step, layer = self.kind[i], int(self.step[i]), int(self.layer[i])
        position, feature, token = int(self.position[i]), int(self.feature[i]), int(self.token[i])
        prompt_length = int(self.metadata.get("prompt_length", 0))
        canvas_length = int(self.metadata.get("canvas_length", 0))
        ctx = position if kind == "prompt" else prompt_length + step * canvas_length + position
        n_layers = int(self.metadata.get("n_layers", 0))
        node = {"step": step, "kind": kind, "position": position, "ctx_idx": ctx, "reverse_ctx_idx": 0}
        node["run_idx"], node["clerp"] = 0, ""
        if kind == "feature":
            node.update(node_id=f"{layer}_{feature}_{ctx}", feature=feature, layer=str(layer))
            node.update(feature_type="cross layer transcoder", activation=float(self.activation[i]))
        elif kind == "error":
            node.update(node_id=f"err_{layer}_{ctx}", feature=-1, layer=str(layer))  # unique, unlike "0_{layer}_{ctx}"
            node.update(feature_type="mlp reconstruction error")
        elif kind in ("token", "prompt"):
            node.update(node_id=f"E_{token}_{ctx}", feature=ctx, layer="E", feature_type="embedding", token=token)
        else:
            node.update(node_id=f"{n_layers + 1}_{token}_{ctx}", feature=token, layer=str(n_layers + 1))
            node.update(feature_type="logit", is_target_logit=True, token_prob=0.0, token=token)
            node["clerp"] = f"target {self.metadata.get('target', '')}"
        node["jsNodeId"] = node["node_id"]
        return node


_NODE_TENSORS = ("step", "layer", "position", "feature", "token", "activation", "value", "bias")


def normalize_rows(
    targets: Int[torch.Tensor, " edge"], weights: Float[torch.Tensor, " edge"], n_nodes: int
) -> Float[torch.Tensor, " edge"]:
    """|A| with each row (a target's incoming edges) scaled to sum 1, edge by edge (sparse)."""
    absolute = weights.abs()
    totals = torch.zeros(n_nodes, dtype=absolute.dtype).index_add_(0, targets, absolute)
    return absolute / totals[targets].clamp(min=1e-10)


def influence(
    targets: Int[torch.Tensor, " edge"],
    sources: Int[torch.Tensor, " edge"],
    normalized: Float[torch.Tensor, " edge"],
    weights: Float[torch.Tensor, " node"],
) -> Float[torch.Tensor, " node"]:
    """weights · (A + A² + A³ + …) for the sparse A of these edges: the graph is acyclic, so the series
    ends after its longest path (circuit-tracer's `compute_influence`)."""

    def step(vector: torch.Tensor) -> torch.Tensor:  # vector @ A
        return torch.zeros_like(vector).index_add_(0, sources, normalized * vector[targets])

    current = step(weights)
    total = current.clone()
    for _ in range(len(weights) + 1):
        current = step(current)
        if not current.any():
            return total
        total = total + current
    raise RuntimeError("influence did not converge: the adjacency has a cycle")


def threshold_for(scores: Float[torch.Tensor, "..."], fraction: float) -> torch.Tensor:
    """The smallest score among the top scores that together carry `fraction` of the total."""
    ordered = torch.sort(scores.flatten(), descending=True).values
    if not len(ordered):
        return torch.tensor(float("inf"))
    cumulative = torch.cumsum(ordered, 0) / ordered.sum().clamp(min=1e-30)
    index = min(int(torch.searchsorted(cumulative, torch.tensor(fraction, dtype=cumulative.dtype))), len(ordered) - 1)
    return ordered[index]


def prune_masks(
    graph: Graph, node_threshold: float, edge_threshold: float
) -> tuple[Bool[torch.Tensor, " node"], Bool[torch.Tensor, " edge"]]:
    """Node mask and edge mask (over `graph.edges()`) of `Graph.prune` (circuit-tracer's `prune_graph`, on
    the edge list: only nonzero entries are edges; at a threshold of exactly 1.0 circuit-tracer's dense mask
    also passes the zeros, which keeps nodes without any edge)."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1, got {value}")
    n = graph.n_nodes
    targets, sources, weights = graph.edges()
    logit_weights = graph.logit_weights()
    node = influence(targets, sources, normalize_rows(targets, weights, n), logit_weights)
    always = torch.tensor([k in ("token", "prompt", "logit") for k in graph.kind])
    node_mask = (node >= threshold_for(node, node_threshold)) | always
    pruned = weights * (node_mask[targets] & node_mask[sources])
    normalized = normalize_rows(targets, pruned, n)
    edge_scores = normalized * (influence(targets, sources, normalized, logit_weights) + logit_weights)[targets]
    edge_mask = (edge_scores >= threshold_for(edge_scores, edge_threshold)) & (pruned != 0)
    is_feature = torch.tensor([k == "feature" for k in graph.kind])
    while True:
        before = node_mask.clone()
        edge_mask &= node_mask[targets] & node_mask[sources]
        has_out = torch.bincount(sources[edge_mask], minlength=n) > 0
        has_in = torch.bincount(targets[edge_mask], minlength=n) > 0
        node_mask &= always | has_out  # features and errors need an outgoing edge
        node_mask &= ~is_feature | has_in  # features need an incoming edge
        if torch.equal(node_mask, before):
            return node_mask, edge_mask
