"""Commit order: in which order does the sampler settle the positions of a canvas?

A position *commits* at the step after which its argmax never changes again (`CanvasTrace.commit_step`).
An autoregressive model commits left to right; a diffusion model need not. Two scores per row:

- Kendall τ-b between position index and commit step: +1 is strictly left to right, -1 right to
  left, 0 no monotone relation; ties (positions committing at the same step) are handled as τ-b does.
- out-of-order share: the fraction of positions that commit strictly before some position to their
  left, i.e. `commit[p] < max(commit[q] for q < p)`. 0 for any left-to-right (or simultaneous) order.

Both are computed over the positions a `mask` selects, usually the answer (`answer_mask`: positions
before the first eos of the final canvas), so trailing padding, which commits at once, does not
dilute the score.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Int

from diffusionlens.sampling.trace import CanvasTrace


def answer_mask(
    final: Int[torch.Tensor, "batch canvas"] | CanvasTrace,
    eos_token_id: int | Iterable[int],
    include_eos: bool = False,
) -> Bool[torch.Tensor, "batch canvas"]:
    """Positions before the first eos of each row of the final canvas (`[batch, canvas]`).

    `final` is a `[batch, canvas]` token tensor or a CanvasTrace (its `final`); rows without an eos are
    all answer. `include_eos` also selects the eos itself.
    """
    tokens = final.final if isinstance(final, CanvasTrace) else final
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    if eos.numel() == 0:
        return torch.ones_like(tokens, dtype=torch.bool)
    is_eos = torch.isin(tokens, eos.to(tokens.device))
    seen = is_eos.int().cumsum(-1)
    return (seen == 0) | (include_eos & is_eos & (seen == 1))


def resolve_mask(
    mask: Bool[torch.Tensor, "batch canvas"] | None, shape: torch.Size
) -> Bool[torch.Tensor, "batch canvas"]:
    """The positions an analysis counts, on the CPU: `mask` (from `answer_mask`) checked against the
    trace's `[batch, canvas]` shape, or every position when it is None."""
    if mask is None:
        return torch.ones(shape, dtype=torch.bool)
    if mask.shape != shape:
        raise ValueError(
            f"mask has shape {tuple(mask.shape)} but the trace's canvas is {tuple(shape)} [batch, canvas]; "
            "build it with answer_mask(trace, eos_token_id)"
        )
    return mask.bool().cpu()


def kendall_tau_b(x: Int[torch.Tensor, " n"] | list[float], y: Int[torch.Tensor, " n"] | list[float]) -> float:
    """Kendall's τ-b between two equally long sequences (ties in either are allowed).

    τ-b = (concordant − discordant) / √((n0 − tx)(n0 − ty)) with n0 = n(n−1)/2 pairs and tx, ty the
    pairs tied in x and in y. nan when either sequence is constant (or n < 2).
    """
    x, y = torch.as_tensor(x, dtype=torch.float64).flatten(), torch.as_tensor(y, dtype=torch.float64).flatten()
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same length, got {x.numel()} and {y.numel()}")
    n = x.numel()
    if n < 2:
        return float("nan")
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    dx = torch.sign(x[None, :] - x[:, None])[upper]
    dy = torch.sign(y[None, :] - y[:, None])[upper]
    n0 = n * (n - 1) / 2
    tied_x, tied_y = float((dx == 0).sum()), float((dy == 0).sum())
    denominator = math.sqrt((n0 - tied_x) * (n0 - tied_y))
    if denominator == 0:
        return float("nan")
    return float((dx * dy).sum()) / denominator


def out_of_order_share(commit: Int[torch.Tensor, " n"] | list[int]) -> float:
    """Fraction of positions that commit strictly before some position to their left (nan if empty)."""
    commit = torch.as_tensor(commit).flatten()
    if commit.numel() == 0:
        return float("nan")
    left_max = torch.cat([commit.new_full((1,), torch.iinfo(torch.int64).min), commit[:-1].cummax(0).values])
    return float((commit < left_max).float().mean())


@dataclass
class CommitOrder:
    """Commit order of one row.

    positions: the canvas positions scored (those the mask selected), ascending `[n]`;
    commit_steps: their commit steps `[n]`; order: those positions sorted by commit step (stable, so
    ties keep left-to-right order) `[n]`; tau: Kendall τ-b of (position, commit step);
    out_of_order_share: fraction of scored positions committing before some scored position to their left.
    """

    row: int
    positions: Int[torch.Tensor, " n"]
    commit_steps: Int[torch.Tensor, " n"]
    order: Int[torch.Tensor, " n"]
    tau: float
    out_of_order_share: float

    def first_committed(self) -> list[int]:
        """The positions that committed at the earliest step."""
        if self.commit_steps.numel() == 0:
            return []
        return self.positions[self.commit_steps == self.commit_steps.min()].tolist()


def commit_steps(
    trace: CanvasTrace, mask: Bool[torch.Tensor, "batch canvas"] | None = None
) -> Int[torch.Tensor, "batch canvas"]:
    """`trace.commit_step()` (the step after which each position's argmax never changes), with -1 where
    `mask` is False."""
    steps = trace.commit_step().cpu()
    return torch.where(resolve_mask(mask, steps.shape), steps, torch.full_like(steps, -1))


def commit_order(trace: CanvasTrace, mask: Bool[torch.Tensor, "batch canvas"] | None = None) -> list[CommitOrder]:
    """Per row: commit steps of the masked positions, Kendall τ-b and the out-of-order share.

    `mask` `[batch, canvas]` picks the positions to score (default: all); `answer_mask(trace, eos_id)`
    keeps the answer only.
    """
    steps = trace.commit_step().cpu()
    mask = resolve_mask(mask, steps.shape)
    rows = []
    for row in range(steps.shape[0]):
        positions = torch.nonzero(mask[row]).flatten()
        commits = steps[row, positions]
        rows.append(
            CommitOrder(
                row=row,
                positions=positions,
                commit_steps=commits,
                order=positions[torch.argsort(commits, stable=True)],
                tau=kendall_tau_b(positions, commits),
                out_of_order_share=out_of_order_share(commits),
            )
        )
    return rows


def commit_order_summary(orders: list[CommitOrder]) -> dict[str, float]:
    """Means over rows of τ (rows where τ is defined) and of the out-of-order share, plus counts."""
    taus = [o.tau for o in orders if not math.isnan(o.tau)]
    shares = [o.out_of_order_share for o in orders if not math.isnan(o.out_of_order_share)]
    return {
        "rows": float(len(orders)),
        "rows_with_tau": float(len(taus)),
        "mean_tau": sum(taus) / len(taus) if taus else float("nan"),
        "mean_out_of_order_share": sum(shares) / len(shares) if shares else float("nan"),
        "rows_out_of_order": float(sum(o.out_of_order_share > 0 for o in orders)),
    }
