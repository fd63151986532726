"""Intermediate context: tokens a step produced that the final canvas does not keep, and whether later
steps read them.

A token is *intermediate* when a step's argmax (or a token accepted into the canvas at that step)
differs from the final canvas at that position. Such tokens still reach later steps through the
canvas and self-conditioning, so they can serve as scratch space. `attention_to_intermediate`
measures how much attention later steps put on the positions that held them.

Decoder attention keys are the prompt's cached keys followed by the canvas
(`DecoderStack.forward`: `block(resid, …, prompt.keys[layer], …)`, and `Attention.forward` concatenates
`(past_k, new_k)`), so canvas position p is key `n_keys − canvas_length + p`. On full-attention layers
of the first canvas `n_keys − canvas_length` is the prompt length; sliding layers keep only the last
`sliding_window − 1` prompt positions and later canvases see earlier canvases as prompt, so the code
always counts canvas keys from the end.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from einops import einsum
from jaxtyping import Bool, Float, Int

from diffusionlens.analysis.commit_order import resolve_mask
from diffusionlens.cache.denoising import DenoisingCache
from diffusionlens.cache.selectors import resolve_layers
from diffusionlens.sampling.trace import CanvasTrace

SOURCES = ("argmax", "accepted")
_PATTERN = re.compile(r"decoder\.blocks\.(\d+)\.attn\.hook_pattern")


@dataclass(frozen=True)
class IntermediateToken:
    """Row `row` had `token` at `position` in step `step`'s argmax (or accepted there), while the final
    canvas has `final_token` at that position."""

    row: int
    step: int
    position: int
    token: int
    final_token: int

    def describe(self, tokenizer) -> str:
        token, final = tokenizer.decode([self.token]), tokenizer.decode([self.final_token])
        return f"row {self.row}, step {self.step}, position {self.position}: {token!r} (final {final!r})"


def intermediate_mask(
    trace: CanvasTrace, source: str = "argmax", mask: Bool[torch.Tensor, "batch canvas"] | None = None
) -> Bool[torch.Tensor, "step batch canvas"]:
    """True where step s's argmax (`source="argmax"`) or the token accepted at step s
    (`source="accepted"`) differs from the final canvas, `[step, batch, canvas]`. Steps after a row
    stopped are False; `mask` `[batch, canvas]` restricts positions."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    final = trace.final.cpu()
    mask = resolve_mask(mask, final.shape)
    if source == "argmax":
        differs = trace.argmax.cpu() != final[None]
    else:
        differs = trace.accepted.cpu() & (trace.sampled.cpu() != final[None])
    live = torch.arange(trace.n_steps)[:, None] <= trace.stop_step().cpu()[None, :]
    return differs & live[:, :, None] & mask[None]


def intermediate_tokens(
    trace: CanvasTrace, source: str = "argmax", mask: Bool[torch.Tensor, "batch canvas"] | None = None
) -> list[IntermediateToken]:
    """Every intermediate token of `intermediate_mask`, ordered by (row, step, position)."""
    where = intermediate_mask(trace, source, mask)
    tokens = trace.argmax.cpu() if source == "argmax" else trace.sampled.cpu()
    final = trace.final.cpu()
    found = [
        IntermediateToken(row=b, step=s, position=p, token=int(tokens[s, b, p]), final_token=int(final[b, p]))
        for s, b, p in torch.nonzero(where).tolist()
    ]
    return sorted(found, key=lambda t: (t.row, t.step, t.position))


@dataclass
class IntermediateAttention:
    """Attention from the canvas queries of each recorded step onto canvas positions that held an
    intermediate token at an earlier step (within `within` steps, or any earlier step).

    steps: recorded steps (axis 0); layers: decoder layers (axis 1);
    mass: `[step, layer, batch]` attention on those positions, summed over them, averaged over heads
    and queries; canvas_mass: `[step, layer, batch]` the same over all canvas keys (the rest goes to
    the prompt); n_positions: `[step, batch]` how many positions are in the set. A position's
    attention to itself is left out of both sums.
    """

    steps: list[int]
    layers: list[int]
    mass: Float[torch.Tensor, "step layer batch"]
    canvas_mass: Float[torch.Tensor, "step layer batch"]
    n_positions: Int[torch.Tensor, "step batch"]
    canvas_length: int

    def relative(self) -> Float[torch.Tensor, "step layer batch"]:
        """(mass / canvas_mass) ÷ (n_positions / (canvas_length − 1)): above 1 when the positions get more
        than their share of the canvas attention; nan where the set is empty."""
        share = self.mass / self.canvas_mass.clamp_min(1e-30)
        expected = self.n_positions.float() / (self.canvas_length - 1)
        return torch.where(expected[:, None] > 0, share / expected[:, None].clamp_min(1e-30), float("nan"))


def attention_to_intermediate(
    cache: DenoisingCache,
    trace: CanvasTrace,
    intermediate: Bool[torch.Tensor, "step batch canvas"] | None = None,
    layers: list[int] | None = None,
    canvas: int = 0,
    within: int | None = None,
) -> IntermediateAttention:
    """Attention later steps put on positions that held intermediate tokens.

    `cache` must hold `decoder.blocks.{l}.attn.hook_pattern` (`[batch, head, query, key]` per step) for
    the same generation as `trace` (the CanvasTrace of `canvas`). `intermediate` defaults to
    `intermediate_mask(trace)`; at step s the key set is the positions flagged at steps
    `s − within … s − 1` (every earlier step when `within` is None). Queries are the canvas positions
    the cache recorded.
    """
    recorded = sorted(int(m.group(1)) for name in cache.names if (m := _PATTERN.fullmatch(name)))
    if not recorded:
        raise ValueError(
            "this cache holds no attention patterns; record them with "
            "names_filter='decoder.blocks.*.attn.hook_pattern' in generate_with_cache"
        )
    n_layers = None if cache.model is None else cache.model.cfg.num_hidden_layers
    layers = recorded if layers is None else resolve_layers(layers, n_layers)
    missing = sorted(set(layers) - set(recorded))
    if missing:
        raise ValueError(f"layers {missing} have no recorded hook_pattern; recorded layers: {recorded}")
    steps = cache.steps(canvas)
    if not steps:
        raise ValueError(f"the cache recorded no steps for canvas {canvas}")
    if max(steps) >= trace.n_steps:
        raise ValueError(
            f"the cache has step {max(steps)} but the trace only {trace.n_steps} steps; pass the trace of the "
            "same generation (result.trace[canvas])"
        )
    if within is not None and within < 1:
        raise ValueError(f"within must be >= 1 or None, got {within}")
    flagged = intermediate_mask(trace) if intermediate is None else intermediate.bool().cpu()
    length = trace.final.shape[-1]
    if flagged.shape != trace.argmax.shape:
        raise ValueError(f"intermediate must be [step, batch, canvas] = {tuple(trace.argmax.shape)}")
    queries = torch.arange(length) if cache.positions is None else torch.tensor(cache.positions)
    not_self = queries[:, None] != torch.arange(length)[None, :]  # [query, key position]
    mass = torch.zeros(len(steps), len(layers), flagged.shape[1])
    canvas_mass = torch.zeros_like(mass)
    n_positions = torch.zeros(len(steps), flagged.shape[1], dtype=torch.long)
    for i, step in enumerate(steps):
        first = 0 if within is None else max(0, step - within)
        keys = flagged[first:step].any(0) if step > first else torch.zeros_like(flagged[0])  # [batch, canvas]
        n_positions[i] = keys.sum(-1)
        weights = keys[:, None, :] & not_self[None]  # [batch, query, key position]
        for j, layer in enumerate(layers):
            pattern = cache.get(f"decoder.blocks.{layer}.attn.hook_pattern", canvas=canvas, step=step)
            pattern = pattern.float().cpu()[..., -length:]  # canvas keys are the last `length`
            if pattern.shape[0] != flagged.shape[1] or pattern.shape[2] != len(queries):
                raise ValueError(
                    f"pattern of layer {layer} has batch/queries {pattern.shape[0]}/{pattern.shape[2]}, expected "
                    f"{flagged.shape[1]}/{len(queries)}; is the trace from the same generation?"
                )
            heads_queries = pattern.shape[1] * pattern.shape[2]
            mass[i, j] = einsum(pattern, weights.float(), "b h q k, b q k -> b") / heads_queries
            canvas_mass[i, j] = einsum(pattern, not_self.float(), "b h q k, q k -> b") / heads_queries
    return IntermediateAttention(steps, layers, mass, canvas_mass, n_positions, length)
