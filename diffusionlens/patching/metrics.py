"""Patching metrics: each maps a `PatchedRun` to a scalar (averaged over the batch)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from diffusionlens.patching.runs import PatchedRun


class _OneStepLogitsMetric:
    """Calling the metric on a run applies its `on_logits` (differentiable, so attribution patching can
    use it too) to the logits of the run's `step` in `canvas`.

    Token fields (`_TOKEN_FIELDS`) take an id or the text of one token; text is turned into ids by
    `with_token_ids(model)`, which `patch_sweep` and `attribution_patch` call before any work."""

    step: int
    canvas: int
    _TOKEN_FIELDS: tuple[str, ...] = ()

    def __call__(self, run: PatchedRun) -> float:
        return float(self.on_logits(run.logits_at(self.step, self.canvas)))

    def with_token_ids(self, model: Any) -> _OneStepLogitsMetric:
        """This metric with every token given as text replaced by its id (with `model.to_single_token`, so
        a model without a tokenizer, or a text of several tokens, is refused naming the fix), and every id
        checked against the model's vocabulary."""
        vocab = model.cfg.vocab_size
        ids = {}
        for name in self._TOKEN_FIELDS:
            token = getattr(self, name)
            if isinstance(token, str):
                try:
                    token = model.to_single_token(token)
                except ValueError as error:
                    raise ValueError(f"{type(self).__name__}({name}={getattr(self, name)!r}): {error}") from None
            elif isinstance(token, bool) or not isinstance(token, int):
                raise TypeError(
                    f"{type(self).__name__}({name}={token!r}): give a token id (int) or the text of one token (str)"
                )
            if not 0 <= token < vocab:
                raise ValueError(
                    f"{type(self).__name__}({name}={token}) is outside the vocabulary [0, {vocab}); "
                    "give an id the model has, or the token's text"
                )
            ids[name] = token
        return replace(self, **ids) if any(ids[n] != getattr(self, n) for n in ids) else self

    def _token_ids(self) -> list[int]:
        texts = {n: getattr(self, n) for n in self._TOKEN_FIELDS if not isinstance(getattr(self, n), int)}
        if texts:
            raise TypeError(
                f"{type(self).__name__} holds token text {texts}: turn it into ids with metric.with_token_ids(model) "
                "(patch_sweep and attribution_patch do this themselves), or give the ids"
            )
        return [getattr(self, n) for n in self._TOKEN_FIELDS]


def with_token_ids(metric: Any, model: Any) -> Any:
    """`metric.with_token_ids(model)` for the metrics that take tokens (also inside `Normalized`); any
    other metric as it is."""
    if isinstance(metric, Normalized):
        return replace(metric, metric=with_token_ids(metric.metric, model))
    return metric.with_token_ids(model) if isinstance(metric, _OneStepLogitsMetric) else metric


@dataclass(frozen=True)
class LogitDiff(_OneStepLogitsMetric):
    """logit[good] - logit[bad] at canvas `position` of `step` (negative: from the base run's end).
    `good` and `bad` are ids or the text of one token each (`LogitDiff(0, "8", "7")`)."""

    position: int
    good: int | str
    bad: int | str
    step: int = -1
    canvas: int = 0
    _TOKEN_FIELDS = ("good", "bad")

    def on_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The metric on one step's logits `[batch, canvas, vocab]`, differentiably."""
        good, bad = self._token_ids()
        at = logits[:, self.position]
        return (at[:, good] - at[:, bad]).mean()


@dataclass(frozen=True)
class TargetProb(_OneStepLogitsMetric):
    """Probability of `token` (an id or the text of one token) at canvas `position` of `step`."""

    position: int
    token: int | str
    step: int = -1
    canvas: int = 0
    _TOKEN_FIELDS = ("token",)

    def on_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The metric on one step's logits `[batch, canvas, vocab]`, differentiably."""
        (token,) = self._token_ids()
        return torch.softmax(logits[:, self.position].float(), -1)[:, token].mean()


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
