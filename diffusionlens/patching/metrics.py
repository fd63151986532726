"""Patching metrics: each maps a `PatchedRun` to a scalar (averaged over the batch)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffusionlens.patching.runs import PatchedRun


class _OneStepLogitsMetric:
    """Calling the metric on a run applies its `on_logits` (differentiable, so attribution patching can
    use it too) to the logits of the run's `step` in `canvas`."""

    step: int
    canvas: int

    def __call__(self, run: PatchedRun) -> float:
        return float(self.on_logits(run.logits_at(self.step, self.canvas)))


@dataclass(frozen=True)
class LogitDiff(_OneStepLogitsMetric):
    """logit[good] - logit[bad] at canvas `position` of `step` (negative: from the base run's end)."""

    position: int
    good: int
    bad: int
    step: int = -1
    canvas: int = 0

    def on_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The metric on one step's logits `[batch, canvas, vocab]`, differentiably."""
        at = logits[:, self.position]
        return (at[:, self.good] - at[:, self.bad]).mean()


@dataclass(frozen=True)
class TargetProb(_OneStepLogitsMetric):
    """Probability of `token` at canvas `position` of `step`."""

    position: int
    token: int
    step: int = -1
    canvas: int = 0

    def on_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The metric on one step's logits `[batch, canvas, vocab]`, differentiably."""
        return torch.softmax(logits[:, self.position].float(), -1)[:, self.token].mean()


@dataclass(frozen=True)
class ExactMatch:
    """Share of rows whose final canvas equals `target` `[batch, canvas]` (free-running runs)."""

    target: torch.Tensor
    canvas: int = 0

    def __call__(self, run: PatchedRun) -> float:
        answer = run.answer(self.canvas)
        return float((answer == self.target.to(answer.device)).all(-1).float().mean())


@dataclass(frozen=True)
class KLToClean:
    """Mean over rows and positions of KL(clean || patched) between the step's output distributions."""

    clean: PatchedRun
    step: int = -1
    canvas: int = 0

    def __call__(self, run: PatchedRun) -> float:
        clean = torch.log_softmax(self.clean.logits_at(self.step, self.canvas).float(), -1)
        patched = torch.log_softmax(run.logits_at(self.step, self.canvas).float(), -1)
        return float((clean.exp() * (clean - patched)).sum(-1).mean())


@dataclass(frozen=True)
class Normalized:
    """(metric(run) - metric(corrupted)) / (metric(clean) - metric(corrupted)): 0 = corrupted, 1 = clean."""

    metric: object
    clean_value: float
    corrupted_value: float

    @classmethod
    def between(cls, metric, clean: PatchedRun, corrupted: PatchedRun) -> Normalized:
        return cls(metric, metric(clean), metric(corrupted))

    def __call__(self, run: PatchedRun) -> float:
        span = self.clean_value - self.corrupted_value
        if span == 0:
            raise ValueError(f"{self.metric} is equal on the clean and corrupted runs; nothing to normalise")
        return (self.metric(run) - self.corrupted_value) / span
