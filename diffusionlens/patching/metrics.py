"""Patching metrics: each maps a `PatchedRun` to a scalar (averaged over the batch).

Every metric says what it reads (`metric_reads`): which run, which canvas and step, and which logits.
The logit metrics read `decoder.hook_logits`, the decoder's logits *after* the final soft-cap
(`softcap * tanh(logit / softcap)`), the values the sampler turns into probabilities; `dla_by_step`
explains the logit *before* the soft-cap (the cap is not linear) and reports it after the cap too
(`DLAByStep.logit_softcapped`), so both can be compared.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from diffusionlens.patching.runs import PatchedRun

#: `logits` in a metric's `reads()`: after the final soft-cap (`decoder.hook_logits`, what sampling
#: reads), or before it (what a direct logit attribution sums to).
POST_SOFTCAP = "post_softcap"
PRE_SOFTCAP = "pre_softcap"


class _OneStepLogitsMetric:
    """Calling the metric on a run applies its `on_logits` (differentiable, so attribution patching can
    use it too) to the logits of the run's `step` in `canvas`.

    Token fields (`_TOKEN_FIELDS`) take an id or the text of one token; text is turned into ids by
    `with_token_ids(model)`, which `patch_sweep` and `attribution_patch` call before any work."""

    step: int
    canvas: int
    _TOKEN_FIELDS: tuple[str, ...] = ()
    logits_read: ClassVar[str] = POST_SOFTCAP

    def __call__(self, run: PatchedRun) -> float:
        return float(self.on_logits(run.logits_at(self.step, self.canvas)))

    def reads(self) -> dict[str, Any]:
        """What the metric reads: the run it is called on, at `canvas` and `step` (negative: from the
        last step of that run's own trajectory), its soft-capped logits."""
        return reads_record(type(self).__name__, "scored", self.canvas, self.step, self.logits_read)

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

    def reads(self) -> dict[str, Any]:
        return reads_record("ExactMatch", "scored", self.canvas, "final", None)


@dataclass(frozen=True)
class KLToClean:
    """Mean over rows and positions of KL(clean || patched) between the step's output distributions."""

    clean: PatchedRun
    step: int = -1
    canvas: int = 0
    logits_read: ClassVar[str] = POST_SOFTCAP

    def reads(self) -> dict[str, Any]:
        """As `LogitDiff.reads`, of the scored run and of the clean run (each step counted on its own)."""
        return reads_record("KLToClean", "scored and clean", self.canvas, self.step, self.logits_read)

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

    def reads(self) -> dict[str, Any]:
        return {**metric_reads(self.metric), "normalized": "0 = the corrupted run's value, 1 = the clean run's"}

    def __call__(self, run: PatchedRun) -> float:
        span = self.clean_value - self.corrupted_value
        if span == 0:
            raise ValueError(f"{self.metric} is equal on the clean and corrupted runs; nothing to normalise")
        return (self.metric(run) - self.corrupted_value) / span


def metric_reads(metric: Any) -> dict[str, Any]:
    """`metric.reads()`; for any other callable, its repr and that it reads the scored run (what it reads
    inside that run is its own business: unknown here)."""
    if hasattr(metric, "reads"):
        return metric.reads()
    return reads_record(repr(metric), "scored", None, None, None)


def reads_record(
    metric: str, run: str, canvas: int | None, step: int | str | list[int] | None, logits: str | None, **more: Any
) -> dict[str, Any]:
    """What a metric reads, in the keys every `reads()` shares: its name, the run it reads ("scored", …), the
    canvas and step it reads there, and which logits (`POST_SOFTCAP`, `PRE_SOFTCAP`, or None for none); then
    `more`."""
    return {"metric": metric, "run": run, "canvas": canvas, "step": step, "logits": logits, **more}


def sweep_metric_reads(metric: Any, mode: str, base: PatchedRun, per_cell: bool) -> dict[str, Any]:
    """`metric_reads` for a patch sweep's metadata, with `step` resolved as the sweep reads it: in frozen
    mode a negative step counts from the base (corrupted) run's last step, so it is that absolute step;
    in free mode each cell's patched run has its own trajectory, and a negative step reads that run's
    own last steps, which differ between cells (`step_counted_from` says so)."""
    reads = {**metric_reads(metric)}
    reads["run"] = reads["run"].replace("scored", f"patched ({mode})")
    step = reads.get("step")
    if per_cell:
        reads["step"], reads["step_counted_from"] = "cell", "each cell's own patched step"
    elif isinstance(step, int) and step < 0:
        canvas = reads.get("canvas") or 0
        if mode == "frozen":
            n_steps = base.trace.steps(canvas) if canvas < len(base.trace) else None
            reads["step"] = None if n_steps is None else n_steps + step
            reads["step_counted_from"] = f"step {step} of the corrupted run's canvas {canvas}"
        else:
            reads["step_counted_from"] = (
                f"step {step} of each cell's own patched run (canvas {canvas}); cells that stop at other steps "
                "read other absolute steps"
            )
    return reads
