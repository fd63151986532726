"""Smearing: a token, or a whole span, showing up displaced from where the canvas finally puts it.

Token smearing (per step, per row): for each final token f at its home position p (where the final
canvas has f), how much of f's probability sits at *nearby* positions instead:

    own    = Σ over home positions p of P_step(token f at position p)
    near   = Σ over positions q within ±window of a home of f, q not itself a home of f, of P_step(f at q)
    score  = near / (own + near)              (nan where own + near = 0)

P is the step's sampling distribution read from the recorded top-k (`generate(..., record_top_k=k)`);
mass outside the top k counts as 0, so the score is computed on the top-k part of the distribution.
A position that is a home of f (the same token repeated in the answer) never counts as smearing.

Sequence smearing (per step, per row): does a span of the final canvas appear shifted by d positions
in the step's argmax? match(d) = fraction of span positions p (with p + d on the canvas) where
argmax_step[p + d] == final[p]. score = max over d ≠ 0 of match(d) − match(0): positive when the draft
looks more like a shifted copy of the final answer than like the answer in place. Repeated tokens give
shifted matches by chance, so compare scores across steps rather than reading one in isolation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int

from diffusionlens.analysis.commit_order import resolve_mask
from diffusionlens.sampling.trace import CanvasTrace


def _shift(x: torch.Tensor, d: int, fill: int | bool) -> torch.Tensor:
    """out[..., q] = x[..., q + d] where q + d is on the canvas, else `fill`."""
    out = torch.full_like(x, fill)
    length = x.shape[-1]
    if d >= 0:
        out[..., : length - d] = x[..., d:]
    else:
        out[..., -d:] = x[..., : length + d]
    return out


def _need_top_k(trace: CanvasTrace) -> None:
    if trace.top_k_probs is None or trace.top_k_tokens is None:
        raise ValueError(
            "token smearing needs the per-step top-k distribution, which this trace did not record; "
            "generate with record_top_k=k (e.g. 8)"
        )


def token_smearing_mass(
    trace: CanvasTrace,
    window: int = 2,
    token_id: int | None = None,
    mask: Bool[torch.Tensor, "batch canvas"] | None = None,
) -> tuple[Float[torch.Tensor, "step batch"], Float[torch.Tensor, "step batch"]]:
    """The two sums of token smearing, `(own, near)`, each `[step, batch]` (see the module docstring).

    `token_id` restricts to one token (its homes are where the final canvas has it); `mask`
    `[batch, canvas]` restricts which positions count as homes (e.g. `answer_mask(trace, eos_id)`).
    """
    _need_top_k(trace)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    tokens, probs = trace.top_k_tokens.cpu(), trace.top_k_probs.cpu().float()
    final = trace.final.cpu()
    homes = resolve_mask(mask, final.shape)
    if token_id is not None:
        homes = homes & (final == token_id)
    home_token = torch.where(homes, final, torch.full_like(final, -1))  # -1 matches no token
    own_hit = tokens == home_token[None, :, :, None]  # [step, batch, canvas, k]
    near_hit = torch.zeros_like(own_hit)
    for d in range(-window, window + 1):
        if d != 0:
            near_hit |= tokens == _shift(home_token, d, -1)[None, :, :, None]
    near_hit &= tokens != final[None, :, :, None]  # a position whose final token is f is a home, not smearing
    own = (probs * own_hit).sum((-1, -2))
    near = (probs * near_hit).sum((-1, -2))
    return own, near


def token_smearing(
    trace: CanvasTrace,
    window: int = 2,
    token_id: int | None = None,
    mask: Bool[torch.Tensor, "batch canvas"] | None = None,
) -> Float[torch.Tensor, "step batch"]:
    """Token smearing score `near / (own + near)` per step and row, `[step, batch]` (nan where a row
    has no mass on its final tokens at all). Needs a trace recorded with `record_top_k`."""
    own, near = token_smearing_mass(trace, window, token_id, mask)
    total = own + near
    return torch.where(total > 0, near / total.clamp_min(1e-30), torch.full_like(total, float("nan")))


@dataclass
class SequenceSmearing:
    """Sequence smearing of each step.

    shifts: the shifts tried (0 first); match: `[shift, step, batch]` fraction of span positions whose
    final token appears d positions over in the step's argmax (nan where the span is empty);
    score: `[step, batch]` best match over d ≠ 0 minus match at d = 0; best_shift: `[step, batch]` the d
    attaining it (the smallest |d| on ties, negative first).
    """

    shifts: list[int]
    match: Float[torch.Tensor, "shift step batch"]
    score: Float[torch.Tensor, "step batch"]
    best_shift: Int[torch.Tensor, "step batch"]


def sequence_smearing(
    trace: CanvasTrace,
    max_shift: int = 3,
    mask: Bool[torch.Tensor, "batch canvas"] | None = None,
    source: str = "argmax",
) -> SequenceSmearing:
    """Per step, how well the step's tokens match the final span shifted by d ∈ [-max_shift, max_shift].

    The span is the final canvas at the positions `mask` selects (default all; `answer_mask(trace,
    eos_id)` for the answer). `source`: "argmax" (the draft) or "sampled" (the drawn tokens).
    """
    if max_shift < 1:
        raise ValueError(f"max_shift must be >= 1, got {max_shift}")
    if source not in ("argmax", "sampled"):
        raise ValueError(f"source must be 'argmax' or 'sampled', got {source!r}")
    drafts = getattr(trace, source).cpu()
    final = trace.final.cpu()
    span = resolve_mask(mask, final.shape)
    shifts = [0] + [d for m in range(1, max_shift + 1) for d in (-m, m)]
    matches = []
    for d in shifts:
        # final[p] against drafts[p + d]: shift the drafts left by d
        moved = _shift(drafts, d, -1)
        on_canvas = _shift(torch.ones_like(span), d, False) & span
        hits = ((moved == final[None]) & on_canvas[None]).sum(-1).float()
        count = on_canvas.sum(-1).float()[None].expand_as(hits)
        matches.append(torch.where(count > 0, hits / count.clamp_min(1), torch.full_like(hits, float("nan"))))
    match = torch.stack(matches)
    shifted = match[1:].nan_to_num(-1.0)
    best, index = shifted.max(0)
    best = torch.where(best < 0, torch.full_like(best, float("nan")), best)
    best_shift = torch.tensor(shifts[1:])[index]
    return SequenceSmearing(shifts, match, best - match[0], best_shift)
