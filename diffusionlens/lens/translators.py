"""Affine translators per decoder layer, conditioned on the denoising step: the trainable half of a tuned lens.

For layer l and step s, with k(s) the step-range bucket holding s:

    T(h) = h + h @ matrix[l, k(s)] + bias[l, k(s)] + h * step_gain[l, s] + step_bias[l, s]

Every parameter starts at zero, so an untrained translator is the identity (exactly: `h + 0`), and the tuned
lens starts as the logit lens. Two kinds are built from this one form:

- "step_embedding": one bucket (a full affine map per layer, shared by every step) plus a per-step gain and
  bias (a learned embedding of the step, `d_model` wide, in each layer);
- "step_buckets": a full affine map per layer and step range (`DEFAULT_BUCKET_STARTS`: steps 0, 1, 2-3, 4-7,
  8-15, 16-31, 32+; trained from residuals, a range with fewer than `ROWS_PER_DIMENSION × d_model` rows joins
  the range before it), no per-step tables.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from torch import nn

KINDS = ("step_embedding", "step_buckets")
#: First step of each step-range bucket of the "step_buckets" kind (the last bucket is open-ended).
DEFAULT_BUCKET_STARTS = (0, 1, 2, 4, 8, 16, 32)
#: A bucket gets its own affine map only with at least this many training rows per model dimension.
ROWS_PER_DIMENSION = 10


def fitted_bucket_starts(
    steps: Int[torch.Tensor, " rows"], min_rows: int, candidates: Sequence[int] = DEFAULT_BUCKET_STARTS
) -> list[int]:
    """The `candidates` whose step range holds at least `min_rows` of the training rows' `steps`; a thinner
    range joins the bucket before it (a full affine map fitted on a few rows of a rare late step overfits)."""
    starts = [0]
    bounds = [*candidates[1:], None]
    for start, end in zip(candidates[1:], bounds[1:], strict=True):
        inside = (steps >= start) if end is None else ((steps >= start) & (steps < end))
        if int(inside.sum()) >= min_rows:
            starts.append(start)
    return starts


class StepTranslators(nn.Module):
    """One translator per (decoder layer, step): see the module docstring for the form and the two kinds.

    n_layers: decoder layers; max_steps: steps the per-step tables cover (a step at or past it is refused);
    bucket_starts: first step of each bucket, increasing from 0; step_tables: whether the per-step gain and
    bias are trained (they stay zero otherwise)."""

    def __init__(
        self,
        n_layers: int,
        d_model: int,
        max_steps: int,
        bucket_starts: Sequence[int] = (0,),
        step_tables: bool = True,
    ) -> None:
        super().__init__()
        starts = [int(s) for s in bucket_starts]
        if not starts or starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:], strict=False)):
            raise ValueError(f"bucket_starts must increase from 0, got {list(bucket_starts)}")
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.n_layers, self.d_model, self.max_steps = n_layers, d_model, max_steps
        self.bucket_starts = starts
        self.step_tables = bool(step_tables)
        self.matrix = nn.Parameter(torch.zeros(n_layers, len(starts), d_model, d_model))
        self.bias = nn.Parameter(torch.zeros(n_layers, len(starts), d_model))
        self.step_gain = nn.Parameter(torch.zeros(n_layers, max_steps, d_model), requires_grad=self.step_tables)
        self.step_bias = nn.Parameter(torch.zeros(n_layers, max_steps, d_model), requires_grad=self.step_tables)

    @classmethod
    def of_kind(cls, kind: str, n_layers: int, d_model: int, max_steps: int) -> StepTranslators:
        """Identity translators of `kind` ("step_embedding" or "step_buckets")."""
        if kind == "step_embedding":
            return cls(n_layers, d_model, max_steps, (0,), step_tables=True)
        if kind == "step_buckets":
            return cls(n_layers, d_model, max_steps, [s for s in DEFAULT_BUCKET_STARTS if s < max_steps])
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")

    @property
    def kind(self) -> str:
        return "step_embedding" if self.step_tables and len(self.bucket_starts) == 1 else "step_buckets"

    def bucket_of(self, steps: Int[torch.Tensor, "*rows"]) -> Int[torch.Tensor, "*rows"]:
        """The bucket index of each step."""
        starts = torch.tensor(self.bucket_starts, device=steps.device)
        return torch.bucketize(steps.contiguous(), starts, right=True) - 1

    def check_steps(self, steps: Int[torch.Tensor, "*rows"]) -> None:
        if steps.numel() and (int(steps.min()) < 0 or int(steps.max()) >= self.max_steps):
            raise ValueError(
                f"steps must lie in 0 … {self.max_steps - 1} (the steps this lens was built for), got "
                f"{int(steps.min())} … {int(steps.max())}; train a lens with a larger max_denoising_steps"
            )

    def forward(
        self, resid: Float[torch.Tensor, "*rows d_model"], layer: int, steps: Int[torch.Tensor, "..."]
    ) -> Float[torch.Tensor, "*rows d_model"]:
        """Translate `resid` read at decoder layer `layer`, each row at its step in `steps` (broadcast to
        the rows: one step for all, or one per row)."""
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} out of range: the lens has translators for layers 0 … {self.n_layers - 1}")
        steps = steps.to(resid.device).expand(resid.shape[:-1])
        self.check_steps(steps)
        matrix, bias = self.matrix[layer].to(resid.dtype), self.bias[layer].to(resid.dtype)
        if len(self.bucket_starts) == 1:
            delta = resid @ matrix[0] + bias[0]
        else:
            buckets = self.bucket_of(steps)
            delta = torch.zeros_like(resid)
            for bucket in buckets.unique().tolist():
                rows = buckets == bucket
                delta = delta.index_put((rows,), resid[rows] @ matrix[bucket] + bias[bucket])
        if self.step_tables:
            gain, shift = self.step_gain[layer, steps], self.step_bias[layer, steps]
            delta = delta + resid * gain.to(resid.dtype) + shift.to(resid.dtype)
        return resid + delta

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
