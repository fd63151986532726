"""`attribute`: an attribution graph of one target logit over a whole denoising trajectory.

The replacement model (`diffusionlens.graphs.replacement`) is affine in its sources, so every node's incoming
edges are one vector-Jacobian product: a cotangent seeded at the node's pre-activation, pushed backwards,
paired with each source's write. All rows travel backwards together, one step at a time and one layer at a
time, from the target's step down to step 0 (a row crosses from step s to s-1 through the transposed,
linearised self-conditioning block). At each (step, layer) the rows already in hand give every active
feature there its influence on the target; the most influential join as rows (circuit-tracer's greedy
selection, in topological order), and the rest are dropped. Memory is the cotangents of the kept rows
(`rows × canvas × d_model`) plus one step's frozen state at a time: it grows with what is kept.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int

from diffusionlens.graphs.graph import Graph
from diffusionlens.graphs.replacement import ReplacementModel, Sources, recorded_sources
from diffusionlens.graphs.trajectory import Trajectory, record_trajectory
from diffusionlens.graphs.transcoders import TranscoderSet

#: `attribute`'s keywords that shape the graph (`attribute_trajectory`'s); the others say which run to record.
GRAPH_OPTIONS = ("max_feature_nodes", "min_influence", "row_chunk")

if TYPE_CHECKING:
    from diffusionlens.model import HookedDiffusionGemma


def attribute(
    model: HookedDiffusionGemma,
    transcoders: TranscoderSet,
    input_ids: Int[torch.Tensor, "1 prompt"],
    target: dict,
    *,
    noise: Any = None,
    canvas: int = 0,
    max_feature_nodes: int | None = 2048,
    min_influence: float = 0.0,
    row_chunk: int = 512,
    store_on: torch.device | str | None = None,
    **generate_options: Any,
) -> Graph:
    """The attribution graph of `target` on the trajectory `generate(input_ids, noise=noise, **generate_options)`
    takes (pass a `ReplayNoise` or seed torch first, so the run is the one you mean).

    target: `dict(position=, step=, token=)`: the pre-soft-cap logit of `token` at canvas `position` of
    `step` (of canvas `canvas`); `token=(a, b)` attributes the difference logit a - logit b. Tokens may be ids
    or single-token strings; `step` may be negative (from the end). At most `max_feature_nodes` features
    (None: every active feature with influence above `min_influence`) are chosen by influence as rows.
    `row_chunk`: rows pushed through attention and self-conditioning at a time (bounds the temporaries);
    `store_on="cpu"` keeps the frozen trajectory in host memory (see `record_trajectory`).
    """
    graph_options = {"max_feature_nodes": max_feature_nodes, "min_influence": min_influence, "row_chunk": row_chunk}
    recording = {"noise": noise, "canvas": canvas, "store_on": store_on, **generate_options}
    return attributed_trajectory(model, transcoders, input_ids, target, graph_options, recording)[0]


def attributed_trajectory(
    model: HookedDiffusionGemma,
    transcoders: TranscoderSet,
    input_ids: Int[torch.Tensor, "1 prompt"],
    target: dict,
    graph_options: dict[str, Any],
    recording: dict[str, Any],
) -> tuple[Graph, Trajectory]:
    """`attribute`'s graph and the trajectory it is of (what `validate.check_graph` replays): `recording` goes to
    `record_trajectory` (`noise`, `canvas`, `store_on` and `generate`'s keywords), `graph_options` to
    `attribute_trajectory` (`GRAPH_OPTIONS`)."""
    check_placement(model, transcoders)
    trajectory = record_trajectory(model, input_ids, **recording)
    graph = attribute_trajectory(model, transcoders, trajectory, target, **graph_options)
    run = run_options(recording)
    graph.metadata["generate_options"] = {k: repr(v) for k, v in run.items() if k != "noise"}
    graph.metadata["noise"] = repr(run.get("noise"))
    return graph, trajectory


def run_options(recording: dict[str, Any]) -> dict[str, Any]:
    """What of `record_trajectory`'s keywords says which run is generated (`noise` and `generate`'s own), without
    which canvas is recorded and where it is stored."""
    return {k: v for k, v in recording.items() if k not in ("canvas", "store_on")}


def check_placement(model: HookedDiffusionGemma, transcoders: TranscoderSet) -> None:
    """Refuse transcoders that do not fit the model (`TranscoderSet.check`) or sit on another device or dtype:
    the replacement model computes in the model's dtype, where the model is."""
    transcoders.check(model)
    weight = transcoders[0].W_enc
    if weight.device != model.device or weight.dtype != model.dtype:
        raise ValueError(
            f"the transcoders are {weight.dtype} on {weight.device} but the model is {model.dtype} on "
            f"{model.device}; pass transcoders.to(model.device, model.dtype)"
        )


def resolve_target(model: HookedDiffusionGemma, trajectory: Trajectory, target: dict) -> tuple[int, int, list]:
    """(step, position, [(token, sign), ...]) of a target dict, refused with the valid ranges."""
    if not isinstance(target, dict) or set(target) != {"position", "step", "token"}:
        raise ValueError(f"target must be dict(position=, step=, token=), got {target!r}")
    n_steps, length = trajectory.n_steps, model.cfg.canvas_length
    step, position = target["step"], target["position"]
    if not isinstance(step, int) or not -n_steps <= step < n_steps:
        raise ValueError(
            f"target step {step!r} is outside the trajectory: it ran steps 0..{n_steps - 1} "
            f"(or -{n_steps}..-1 from the end)"
        )
    if not isinstance(position, int) or not 0 <= position < length:
        raise ValueError(f"target position {position!r} is outside the canvas: positions 0..{length - 1}")
    tokens = target["token"]
    pairs = list(zip(tokens, (1.0, -1.0), strict=True)) if isinstance(tokens, (tuple, list)) else [(tokens, 1.0)]
    if isinstance(tokens, (tuple, list)) and len(tokens) != 2:
        raise ValueError(f"a token difference is a pair (a, b), got {tokens!r}")
    resolved = []
    for token, sign in pairs:
        token_id = model.to_single_token(token) if isinstance(token, str) else token
        try:  # an int, a numpy integer or a one-element integer tensor
            token_id = operator.index(token_id.item() if isinstance(token_id, torch.Tensor) else token_id)
        except TypeError:
            token_id = None
        if token_id is None or isinstance(token, bool) or not 0 <= token_id < model.cfg.vocab_size:
            raise ValueError(f"target token {token!r} is not a token id in 0..{model.cfg.vocab_size - 1}")
        resolved.append((token_id, sign))
    return step % n_steps, position, resolved


class _Edges:
    """Edges found so far, per source kind, as (target row, local source index, weight) triples."""

    def __init__(self) -> None:
        self.parts: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        self.prompt_weights = torch.zeros(0, 0)  # [rows, prompt]: summed over layers and steps at the end

    def add(self, kind: str, weights: torch.Tensor, columns: torch.Tensor | None = None) -> None:
        """`weights [rows, n]`: row r's edge from source `columns[j]` (default j)."""
        rows, cols = weights.nonzero(as_tuple=True)
        local = cols if columns is None else columns.to(cols.device)[cols]
        # kept in host memory: the edges of a long trajectory outgrow the device long before the sweep does
        self.parts.setdefault(kind, []).append((rows.cpu(), local.cpu(), weights[rows, cols].cpu()))

    def gathered(self, kind: str, offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        parts = self.parts.get(kind, [])
        if not parts:
            empty = torch.zeros(0, dtype=torch.long)
            return empty, empty, torch.zeros(0)
        rows, cols, weights = (torch.cat(x) for x in zip(*parts, strict=True))
        return rows, cols + offset, weights


def attribute_trajectory(
    model: HookedDiffusionGemma,
    transcoders: TranscoderSet,
    trajectory: Trajectory,
    target: dict,
    *,
    max_feature_nodes: int | None = 2048,
    min_influence: float = 0.0,
    row_chunk: int = 512,
) -> Graph:
    """`attribute` on an already recorded `Trajectory` (see there)."""
    check_placement(model, transcoders)
    target_step, target_position, tokens = resolve_target(model, trajectory, target)
    replacement = ReplacementModel(model, transcoders, trajectory)
    sources = recorded_sources(trajectory, transcoders)
    n_layers, length = model.cfg.num_hidden_layers, model.cfg.canvas_length
    with torch.no_grad():
        stored_on = trajectory.steps[0].pre_logits.device  # every feature's pre-activation stays there
        actual = replacement.forward(sources, target_step + 1, keep_on=stored_on)
        base = replacement.forward(None, target_step + 1, keep_on=stored_on)
        seed = torch.zeros(1, length, model.cfg.vocab_size, dtype=model.dtype, device=model.device)
        for token, sign in tokens:
            seed[0, target_position, token] += sign
        cot = replacement.logit_transpose(target_step, seed)
        target_value = sum(sign * actual.pre_logits[target_step][target_position, t] for t, sign in tokens)
        target_bias = sum(sign * base.pre_logits[target_step][target_position, t] for t, sign in tokens)
        sweep = _Sweep(replacement, sources, cot, max_feature_nodes, min_influence, row_chunk)
        for step in range(target_step, -1, -1):
            sweep.run_step(step)
    features = torch.tensor(sweep.selected, dtype=torch.long).reshape(-1, 4)  # step, layer, position, feature
    values = [actual.pre_acts[s][layer][p, f] for s, layer, p, f in features.tolist()]
    biases = [base.pre_acts[s][layer][p, f] for s, layer, p, f in features.tolist()]
    activations = [sources.acts[s][layer][p, f] for s, layer, p, f in features.tolist()]
    n_steps = target_step + 1
    sweep.edges.prompt_weights = sweep.prompt_edges
    return _assemble(
        model,
        trajectory,
        sweep.edges,
        features,
        values,
        biases,
        activations,
        n_steps,
        n_layers,
        (target_step, target_position, tokens, float(target_value), float(target_bias)),
    )


class _Sweep:
    """The backward sweep's state: cotangents of every row so far, their influence and normaliser, the
    features chosen as rows, and the edges found."""

    def __init__(
        self,
        replacement: ReplacementModel,
        sources: Sources,
        target_cot: torch.Tensor,
        max_feature_nodes: int | None,
        min_influence: float,
        row_chunk: int,
    ) -> None:
        self.replacement, self.sources = replacement, sources
        # Row cotangents [rows, pos, d_model] in one buffer with room for every row the budget allows, so
        # that adding rows and crossing a layer never copies them (row 0 is the target logit).
        capacity = 1 + (max_feature_nodes or 0)
        self.buffer = target_cot.new_empty(capacity, *target_cot.shape[1:])
        self.buffer[:1] = target_cot
        self.n_rows = 1
        self.influence = torch.ones(1, dtype=target_cot.dtype, device=target_cot.device)
        self.abs_total = torch.zeros_like(self.influence)
        self.budget = max_feature_nodes
        self.min_influence = min_influence
        self.row_chunk = row_chunk
        self.selected: list[tuple[int, int, int, int]] = []
        self.edges = _Edges()
        cfg = replacement.cfg
        self.length, self.n_layers, self.prompt_length = (
            cfg.canvas_length,
            cfg.num_hidden_layers,
            replacement.trajectory.prompt_length,
        )
        self.prompt_edges = torch.zeros(1, self.prompt_length, dtype=target_cot.dtype, device=target_cot.device)

    @property
    def cot(self) -> torch.Tensor:
        return self.buffer[: self.n_rows]

    def add_rows(self, seeds: torch.Tensor) -> None:
        end = self.n_rows + len(seeds)
        if end > len(self.buffer):  # no budget: grow
            self.buffer = torch.cat((self.buffer[: self.n_rows], seeds))
        else:
            self.buffer[self.n_rows : end] = seeds
        self.n_rows = end

    def chunks(self) -> list[torch.Tensor]:
        """Views of `row_chunk` rows each: every transpose is row by row, so a chunk is updated in place."""
        return list(self.cot.split(self.row_chunk))

    def run_step(self, step: int) -> None:
        frozen = self.replacement.frozen(step)
        for layer in range(self.n_layers - 1, -1, -1):
            self.run_layer(step, layer)
        token_edges = torch.einsum("rpd,pd->rp", self.cot, frozen.post_norm_scale * frozen.token_embed)
        self.edges.add("token", token_edges, step * self.length + torch.arange(self.length))
        if step > 0:
            for chunk in self.chunks():
                chunk.copy_(self.replacement.self_cond_transpose(step, chunk, self.row_chunk))

    def run_layer(self, step: int, layer: int) -> None:
        replacement = self.replacement
        block = replacement.model.decoder.blocks[layer]
        frozen = replacement.frozen(step).layers[layer]
        transcoder = replacement.transcoders[layer]
        cot = self.cot.mul_(block.layer_scalar)  # now at the feed-forward write, and at resid_mid
        acts = self.sources.acts[step][layer].to(cot.device)
        positions, features = acts.nonzero(as_tuple=True)
        activation = acts[positions, features]
        feature_edges = active_feature_edges(cot, transcoder.W_dec, positions, features, activation)
        error_edges = torch.einsum("rpd,pd->rp", cot, self.sources.errors[step][layer].to(cot.device))
        error_base = (step * self.n_layers + layer) * self.length
        self.edges.add("error", error_edges, error_base + torch.arange(self.length))
        magnitude = feature_edges.abs()
        self.abs_total += magnitude.sum(1) + error_edges.abs().sum(1)
        scores = (self.influence / self.abs_total.clamp(min=1e-30)) @ magnitude
        del magnitude
        chosen = self.choose(scores)
        self.edges.add("feature", feature_edges[:, chosen], len(self.selected) + torch.arange(len(chosen)))
        new_positions, new_features = positions[chosen], features[chosen]
        self.selected += [
            (step, layer, p, f) for p, f in zip(new_positions.tolist(), new_features.tolist(), strict=True)
        ]
        if len(chosen):
            self.add_rows(replacement.feature_seed(step, layer, new_positions, new_features).to(cot.dtype))
            self.influence = torch.cat((self.influence, scores[chosen]))
            self.abs_total = torch.cat((self.abs_total, torch.zeros_like(scores[chosen])))
            self.prompt_edges = torch.cat(
                (self.prompt_edges, self.prompt_edges.new_zeros(len(chosen), self.prompt_length))
            )
        effects = []
        for chunk in self.chunks():
            back, prompt_effect = replacement.attention_transpose(layer, frozen, chunk)
            chunk.add_(back)  # the residual path plus attention's: now at resid_pre
            effects.append(prompt_effect)
        prompt_effect = torch.cat(effects)
        kept = prompt_effect.shape[1]
        if kept:
            self.prompt_edges[:, self.prompt_length - kept :] += prompt_effect
            self.abs_total += prompt_effect.abs().sum(1)

    def choose(self, scores: torch.Tensor) -> torch.Tensor:
        """Indices of the features to add as rows: by influence, above `min_influence`, within the budget."""
        order = torch.argsort(scores, descending=True)
        order = order[scores[order] > self.min_influence]
        if self.budget is not None:
            order = order[: max(self.budget - len(self.selected), 0)]
        return order


def active_feature_edges(
    cot: Float[torch.Tensor, "rows pos d_model"],
    W_dec: Float[torch.Tensor, "d_transcoder d_model"],
    positions: Int[torch.Tensor, " active"],
    features: Int[torch.Tensor, " active"],
    activation: Float[torch.Tensor, " active"],
) -> Float[torch.Tensor, "rows active"]:
    """Each row's edge from each active feature: activation × (cotangent at its position · its decoder row).

    Sparse activations (real transcoders: L0 of tens to hundreds in a width of thousands): one matmul per
    position over that position's active features (`positions` sorted, as `nonzero` gives them), so the
    cost follows L0 × positions, not the width. Dense ones (random transcoders: about half active): one
    matmul against the whole decoder and a gather, which is faster there."""
    W = W_dec.to(cot.dtype)
    n_rows, length = cot.shape[:2]
    if len(positions) * 8 > length * W.shape[0]:
        return torch.cat([(chunk @ W.T)[:, positions, features] for chunk in cot.split(256)]) * activation
    by_position = cot.transpose(0, 1).contiguous()  # [pos, rows, d]: each position's rows contiguous
    counts = torch.bincount(positions, minlength=length).tolist()
    parts = [W[chunk] @ by_position[p].T for p, chunk in enumerate(features.split(counts)) if counts[p]]
    if not parts:
        return cot.new_zeros(n_rows, 0)
    return (torch.cat(parts) * activation[:, None]).T


def _assemble(model, trajectory, edges, features, values, biases, activations, n_steps, n_layers, target) -> Graph:
    """The Graph: nodes in circuit-tracer's order and the sparse adjacency from the sweep's edges."""
    target_step, target_position, tokens, target_value, target_bias = target
    length, prompt_length = model.cfg.canvas_length, trajectory.prompt_length
    n_features, n_errors, n_tokens = len(features), n_steps * n_layers * length, n_steps * length
    offsets = {"feature": 0, "error": n_features, "token": n_features + n_errors}
    prompt_offset = n_features + n_errors + n_tokens
    n_nodes = prompt_offset + prompt_length + 1
    logit_index = n_nodes - 1
    row_index = torch.cat((torch.tensor([logit_index]), torch.arange(n_features)))  # sweep row -> node
    parts = [edges.gathered(kind, offset) for kind, offset in offsets.items()]
    prompt_weights = edges.prompt_weights
    prompt_rows, prompt_cols = prompt_weights.nonzero(as_tuple=True)
    parts.append((prompt_rows, prompt_cols + prompt_offset, prompt_weights[prompt_rows, prompt_cols]))
    rows = torch.cat([row_index[p[0].cpu()] for p in parts])
    cols = torch.cat([p[1].cpu() for p in parts])
    weights = torch.cat([p[2].cpu() for p in parts])
    adjacency = torch.sparse_coo_tensor(
        torch.stack((rows, cols)), weights, (n_nodes, n_nodes), check_invariants=True
    ).coalesce()

    def column(values_by_kind: dict[str, list], fill) -> list:
        return [
            *values_by_kind.get("feature", [fill] * n_features),
            *values_by_kind.get("error", [fill] * n_errors),
            *values_by_kind.get("token", [fill] * n_tokens),
            *values_by_kind.get("prompt", [fill] * prompt_length),
            *values_by_kind.get("logit", [fill]),
        ]

    grid_steps = torch.arange(n_steps).repeat_interleave(n_layers * length)
    grid_layers = torch.arange(n_layers).repeat_interleave(length).repeat(n_steps)
    grid_positions = torch.arange(length).repeat(n_steps * n_layers)
    canvas_tokens = torch.cat([trajectory.steps[s].canvas for s in range(n_steps)])
    prompt_ids = trajectory.prompt_ids if trajectory.prompt_ids is not None else trajectory.input_ids[0]
    step = column(
        {
            "feature": features[:, 0].tolist(),
            "error": grid_steps.tolist(),
            "token": torch.arange(n_steps).repeat_interleave(length).tolist(),
            "prompt": [-1] * prompt_length,
            "logit": [target_step],
        },
        -1,
    )
    layer = column({"feature": features[:, 1].tolist(), "error": grid_layers.tolist()}, -1)
    position = column(
        {
            "feature": features[:, 2].tolist(),
            "error": grid_positions.tolist(),
            "token": torch.arange(length).repeat(n_steps).tolist(),
            "prompt": list(range(prompt_length)),
            "logit": [target_position],
        },
        -1,
    )
    feature = column({"feature": features[:, 3].tolist()}, -1)
    token = column({"token": canvas_tokens.tolist(), "prompt": prompt_ids.tolist(), "logit": [tokens[0][0]]}, -1)
    nan = float("nan")
    activation = column({"feature": [float(a) for a in activations]}, nan)
    value = column({"feature": [float(v) for v in values], "logit": [target_value]}, nan)
    bias = column({"feature": [float(b) for b in biases], "logit": [target_bias]}, 0.0)
    kinds = (
        ["feature"] * n_features + ["error"] * n_errors + ["token"] * n_tokens + ["prompt"] * prompt_length + ["logit"]
    )
    dtype = weights.dtype
    metadata = {
        "target": {"step": target_step, "position": target_position, "tokens": [[t, s] for t, s in tokens]},
        "prompt_length": prompt_length,
        "canvas_length": length,
        "n_layers": n_layers,
        "n_steps": n_steps,
        "canvas": trajectory.canvas_index,
        "canvases": [trajectory.steps[s].canvas.tolist() for s in range(n_steps)],
        "context_tokens": [str(t) for t in prompt_ids.tolist()]
        + [f"s{s}:{t}" for s in range(n_steps) for t in trajectory.steps[s].canvas.tolist()],
    }
    return Graph(
        kinds,
        *(torch.tensor(x, dtype=torch.long) for x in (step, layer, position, feature, token)),
        *(torch.tensor(x, dtype=dtype) for x in (activation, value, bias)),
        adjacency,
        metadata,
    )
