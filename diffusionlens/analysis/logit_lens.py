"""Logit lens across denoising steps: what each decoder layer would predict, at every step.

`DenoisingCache.logit_lens(step)` reads one step (`[layers + 1, batch, pos, vocab]`: the residual
before every block and after the last, through the final norm and the soft-capped tied head).
`logit_lens_by_step` stacks it over the recorded steps for chosen positions, keeping only the top
tokens and, given the final canvas, the probability of the final token, so memory does not grow
with the vocabulary. Probabilities are the softmax of the lens logits (no sampling temperature).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int

from diffusionlens.cache.denoising import DenoisingCache
from diffusionlens.components.unembed import unembed
from diffusionlens.sampling.trace import CanvasTrace

if TYPE_CHECKING:
    from diffusionlens.model import HookedDiffusionGemma


@dataclass
class LogitLensByStep:
    """steps: recorded steps (axis 0); layer axis: residual before block 0 … after the last block
    (`layers + 1`); positions: canvas positions (last axis before `top`).

    top_tokens / top_probs: `[step, layer, batch, pos, top]`; final_tokens: `[batch, pos]`;
    final_probs: `[step, layer, batch, pos]` probability of the final token (None without `final`).
    """

    steps: list[int]
    positions: list[int]
    top_tokens: Int[torch.Tensor, "step layer batch pos top"]
    top_probs: Float[torch.Tensor, "step layer batch pos top"]
    final_tokens: Int[torch.Tensor, "batch pos"] | None = None
    final_probs: Float[torch.Tensor, "step layer batch pos"] | None = None

    @property
    def top1(self) -> Int[torch.Tensor, "step layer batch pos"]:
        """The lens's most likely token, `[step, layer, batch, pos]`."""
        return self.top_tokens[..., 0]

    def first_layer_correct(self) -> Int[torch.Tensor, "step batch pos"]:
        """Per step and position, the first layer whose top-1 is the final token (-1 if none)."""
        if self.final_tokens is None:
            raise ValueError("this lens was computed without final=; pass final=result.trace[canvas]")
        hit = self.top1 == self.final_tokens[None, None]
        first = hit.int().argmax(1)
        return torch.where(hit.any(1), first, torch.full_like(first, -1))


def _lens_inputs(
    cache: DenoisingCache, canvas: int, model: HookedDiffusionGemma | None
) -> tuple[HookedDiffusionGemma, list[int], list[int]]:
    """The model a lens reads through (the cache's unless given), the steps recorded for `canvas` and the
    canvas positions recorded, refusing a cache with no model or no step."""
    model = model if model is not None else cache.model
    if model is None:
        raise ValueError("this cache has no model attached (reopened from disk?); pass model=")
    steps = cache.steps(canvas)
    if not steps:
        raise ValueError(f"the cache recorded no steps for canvas {canvas}")
    length = model.cfg.canvas_length
    return model, steps, list(range(length)) if cache.positions is None else list(cache.positions)


def logit_lens_by_step(
    cache: DenoisingCache,
    positions: Sequence[int] | int | None = None,
    top: int = 1,
    canvas: int = 0,
    final: Int[torch.Tensor, "batch canvas"] | CanvasTrace | None = None,
    model: HookedDiffusionGemma | None = None,
) -> LogitLensByStep:
    """Top-`top` lens tokens and probabilities of every layer at every recorded step.

    `cache` needs `decoder.blocks.*.hook_resid_pre` and the last block's `hook_resid_post` (record with
    names_filter=['decoder.blocks.*.hook_resid_pre', 'decoder.blocks.*.hook_resid_post']). `positions`:
    canvas positions (default: all recorded). `final`: the final canvas (`result.trace[canvas]` or
    `[batch, canvas]` tokens) for `final_probs`. `model`: needed only for a cache reopened from disk.
    """
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    model, steps, recorded = _lens_inputs(cache, canvas, model)
    length = model.cfg.canvas_length
    if positions is None:
        positions = recorded
    positions = [positions] if isinstance(positions, int) else [int(p) % length for p in positions]
    absent = [p for p in positions if p not in recorded]
    if absent:
        raise ValueError(f"positions {absent} were not recorded; the cache holds positions {recorded}")
    index = torch.tensor([recorded.index(p) for p in positions])
    W_E, softcap = model.decoder.embed.W_E, model.cfg.final_logit_softcapping
    tokens, probs, final_probs = [], [], []
    final_tokens = None
    if final is not None:
        final_tokens = (final.final if isinstance(final, CanvasTrace) else final).cpu()[:, positions]
    for step in steps:
        view = cache.step_cache(step, canvas)
        view.model = model
        resid = view.accumulated_resid(apply_ln=True, stack="decoder")  # [layer, batch, pos, d_model]
        logits = unembed(resid[:, :, index.to(resid.device)], W_E, softcap)
        p = torch.softmax(logits.float(), dim=-1).cpu()
        best = p.topk(min(top, p.shape[-1]), dim=-1)
        tokens.append(best.indices)
        probs.append(best.values)
        if final_tokens is not None:
            if final_tokens.shape[0] != p.shape[1]:
                raise ValueError(f"final has {final_tokens.shape[0]} rows but the cache {p.shape[1]}")
            gather = final_tokens[None, :, :, None].expand(p.shape[0], -1, -1, 1)
            final_probs.append(p.gather(-1, gather).squeeze(-1))
    return LogitLensByStep(
        steps=steps,
        positions=positions,
        top_tokens=torch.stack(tokens),
        top_probs=torch.stack(probs),
        final_tokens=final_tokens,
        final_probs=torch.stack(final_probs) if final_probs else None,
    )


def logit_lens_logits(
    model, resid: Float[torch.Tensor, "*batch d_model"], *, stack: str = "decoder"
) -> Float[torch.Tensor, "*batch vocab"]:
    """The logit lens on residual-stream vectors: `stack`'s final norm and the soft-capped tied head, the path
    the model's own head takes from its last residual (fp32 logits). On the decoder's last `hook_resid_post`
    these are the model's logits; on an earlier layer's, what that layer would predict."""
    norm = model.get_submodule(f"{stack}.ln_final")
    W_E = model.get_submodule(stack).embed.W_E
    x = norm(resid.to(device=W_E.device, dtype=W_E.dtype))
    return unembed(x, W_E, model.cfg.final_logit_softcapping)


def logit_lens_rows(
    model, resid: Float[torch.Tensor, "rows d_model"], *, stack: str = "decoder", chunk: int = 65536
) -> Int[torch.Tensor, " rows"]:
    """The logit lens on a matrix of residual-stream rows (e.g. `ActivationStore.activations(hook)` or
    `CausalRows.activations(hook)`): each row through `stack`'s final norm and the soft-capped tied head,
    its most likely token. On the last block's `hook_resid_post` this is the model's own argmax
    (the draft token for `HookedDiffusionGemma`'s decoder, the greedy token for a `HookedGemma4CausalLM`
    with stack="causal")."""
    out = []
    with torch.no_grad():
        for start in range(0, resid.shape[0], chunk):
            out.append(logit_lens_logits(model, resid[start : start + chunk], stack=stack).argmax(-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


LENS_METRICS = ("prob", "logit_diff")


@dataclass
class LensTokenScores:
    """The logit lens of chosen tokens at one canvas position, by step and layer.

    values: `[step, layer]`; layer axis as `LogitLensByStep` (residual before block 0 … after the last).
    metric "prob": the lens probability of `tokens` (summed over them); "logit_diff": the lens logit of
    `tokens[0]` minus that of `tokens[1]` (soft-capped logits, as the model's output).
    """

    steps: list[int]
    values: Float[torch.Tensor, "step layer"]
    tokens: list[int]
    metric: str
    position: int
    canvas: int = 0
    row: int = 0


def logit_lens_token_scores(
    cache: DenoisingCache,
    position: int,
    tokens: Sequence[int] | int,
    *,
    metric: str = "prob",
    canvas: int = 0,
    row: int = 0,
    model: HookedDiffusionGemma | None = None,
) -> LensTokenScores:
    """The logit lens of `tokens` at canvas `position` of batch `row`, at every recorded step and layer:
    the probability of the tokens (`metric="prob"`, one or more tokens) or the logit difference of two
    (`metric="logit_diff"`). The cache needs what `logit_lens_by_step` needs, at that position."""
    model, steps, recorded = _lens_inputs(cache, canvas, model)
    tokens = [tokens] if isinstance(tokens, int) else [int(t) for t in tokens]
    if metric not in LENS_METRICS:
        raise ValueError(f"metric must be one of {LENS_METRICS}, got {metric!r}")
    if metric == "logit_diff" and len(tokens) != 2:
        raise ValueError(f"metric='logit_diff' takes two tokens (good, bad), got {len(tokens)}")
    if not tokens:
        raise ValueError("give at least one token")
    vocab = model.cfg.vocab_size
    if any(not 0 <= t < vocab for t in tokens):
        raise ValueError(f"tokens {tokens} out of range: the vocabulary has {vocab} ids")
    length = model.cfg.canvas_length
    if position % length not in recorded:
        raise ValueError(f"position {position} was not recorded; the cache holds positions {recorded}")
    column = recorded.index(position % length)
    index = torch.tensor(tokens)
    with torch.no_grad():
        rows = [_lens_scores_at(cache, model, step, canvas, row, column, index, metric) for step in steps]
    return LensTokenScores(steps, torch.stack(rows), tokens, metric, position % length, canvas, row)


def _lens_scores_at(
    cache: DenoisingCache,
    model: HookedDiffusionGemma,
    step: int,
    canvas: int,
    row: int,
    column: int,
    index: torch.Tensor,
    metric: str,
) -> Float[torch.Tensor, " layer"]:
    """One step's row of `logit_lens_token_scores`."""
    view = cache.step_cache(step, canvas)
    view.model = model
    resid = view.accumulated_resid(apply_ln=True, stack="decoder")  # [layer, batch, pos, d_model]
    if not 0 <= row < resid.shape[1]:
        raise IndexError(f"row {row} out of range: the cache has batch size {resid.shape[1]}")
    logits = unembed(resid[:, row, column], model.decoder.embed.W_E, model.cfg.final_logit_softcapping)
    logits = logits.float().cpu()  # [layer, vocab]
    if metric == "prob":
        return torch.softmax(logits, dim=-1)[:, index].sum(-1)
    return logits[:, index[0]] - logits[:, index[1]]
