"""Training translators against the model's own final-layer distribution, and the KL table readers are judged by.

The target of a row (run, step, position) is the model's output distribution at that step, the softmax of its
logits: the final norm and soft-capped head applied to the last block's `hook_resid_post`. A reader maps the
residual of an earlier layer to logits; its loss is KL(target ‖ reader). The canvas's positions after the
answer (pad) outnumber the answer's several times over and are easy, so training weighs the answer rows and
the other rows equally (each half of the loss), and the tables report answer rows unless asked otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Bool, Float, Int
from tqdm.auto import tqdm

from diffusionlens.analysis.logit_lens import logit_lens_logits
from diffusionlens.lens.harvest import StepResiduals
from diffusionlens.lens.translators import StepTranslators

if TYPE_CHECKING:
    from diffusionlens.model import HookedDiffusionGemma

#: reader(resid [rows, d_model], layer, steps [rows]) -> logits [rows, vocab]
Reader = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]


def target_log_probs(
    model: HookedDiffusionGemma, data: StepResiduals, chunk: int = 8192
) -> Float[torch.Tensor, "rows vocab"]:
    """The model's own output log-probabilities at every row (from the last layer's residual)."""
    with torch.no_grad():
        parts = [
            torch.log_softmax(logit_lens_logits(model, data.resid[start : start + chunk, -1]).float(), -1).cpu()
            for start in range(0, len(data), chunk)
        ]
    return torch.cat(parts) if parts else torch.zeros(0, model.cfg.vocab_size)


def kl_to_target(
    logits: Float[torch.Tensor, "rows vocab"], target: Float[torch.Tensor, "rows vocab"]
) -> Float[torch.Tensor, " rows"]:
    """KL(target ‖ softmax(logits)) per row, `target` given as log-probabilities."""
    log_q = torch.log_softmax(logits.float(), dim=-1)
    return (target.exp() * (target - log_q)).sum(-1)


def logit_lens_reader(model: HookedDiffusionGemma) -> Reader:
    """The logit lens as a reader: the final norm and head on the layer's residual, whatever the step."""
    return lambda resid, layer, steps: logit_lens_logits(model, resid)


def translated_reader(model: HookedDiffusionGemma, translators: StepTranslators) -> Reader:
    """Translators followed by the logit lens: the tuned lens as a reader."""
    return lambda resid, layer, steps: logit_lens_logits(model, translators(resid, layer, steps))


def reader_kl(
    model: HookedDiffusionGemma,
    data: StepResiduals,
    reader: Reader,
    target: Float[torch.Tensor, "rows vocab"] | None = None,
    chunk: int = 8192,
) -> Float[torch.Tensor, "rows layer"]:
    """KL of `reader` to the model's output at every row and layer."""
    target = target_log_probs(model, data, chunk) if target is None else target
    out = torch.zeros(len(data), data.n_layers)
    with torch.no_grad():
        for start in range(0, len(data), chunk):
            rows = slice(start, start + chunk)
            for layer in range(data.n_layers):
                logits = reader(data.resid[rows, layer], layer, data.step[rows])
                out[rows, layer] = kl_to_target(logits, target[rows]).cpu()
    return out


@dataclass
class LensKL:
    """Mean KL(model output ‖ reader) by (layer, step): `values [layer, step]`, `counts [step]` rows each."""

    layers: list[int]
    steps: list[int]
    values: Float[torch.Tensor, "layer step"]
    counts: Int[torch.Tensor, " step"]

    def mean(self) -> Float[torch.Tensor, " layer"]:
        """Per layer, the mean over rows (steps weighted by their row counts)."""
        weights = self.counts.float() / self.counts.sum()
        return (self.values * weights).sum(-1)

    def to_dict(self) -> dict:
        return {
            "layers": self.layers,
            "steps": self.steps,
            "values": self.values.tolist(),
            "counts": self.counts.tolist(),
        }


def kl_table(
    per_row: Float[torch.Tensor, "rows layer"], data: StepResiduals, rows: Bool[torch.Tensor, " rows"]
) -> LensKL:
    """`per_row` (from `reader_kl`) averaged by step over the rows `rows` selects."""
    steps = sorted(set(data.step[rows].tolist()))
    values = torch.zeros(per_row.shape[1], len(steps))
    counts = torch.zeros(len(steps), dtype=torch.long)
    for column, step in enumerate(steps):
        chosen = rows & (data.step == step)
        counts[column] = int(chosen.sum())
        values[:, column] = per_row[chosen].mean(0)
    return LensKL(list(range(per_row.shape[1])), steps, values, counts)


def balanced_weights(data: StepResiduals) -> Float[torch.Tensor, " rows"]:
    """Row weights summing to 1: half on the answer rows, half on the others (all on one side if the other is empty)."""
    answer = data.in_answer
    n_answer, n_other = int(answer.sum()), int((~answer).sum())
    share = 0.5 if n_answer and n_other else 1.0
    weights = torch.where(answer, share / max(n_answer, 1), share / max(n_other, 1))
    return weights / weights.sum()


def fit_translators(
    model: HookedDiffusionGemma,
    translators: StepTranslators,
    data: StepResiduals,
    *,
    epochs: int = 20,
    lr: float = 3e-3,
    batch_size: int = 2048,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Train `translators` in place to minimise the weighted KL to the model's output (Adam, cosine-decayed
    learning rate, rows shuffled with `seed`). The last layer's translator is left as it is: its residual is
    the one the model reads out, so its target is itself. Returns the weighted training loss of each epoch."""
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    frozen = [p for p in model.parameters() if p.requires_grad]
    try:  # the model only carries the gradient back to the translators: none of it lands on its weights
        for parameter in frozen:
            parameter.requires_grad_(False)
        return train_epochs(model, translators, data, epochs, lr, batch_size, seed, progress)
    finally:
        for parameter in frozen:
            parameter.requires_grad_(True)


def train_epochs(
    model: HookedDiffusionGemma,
    translators: StepTranslators,
    data: StepResiduals,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    progress: bool,
) -> list[float]:
    """`fit_translators`' loop, with the model's weights frozen."""
    target = target_log_probs(model, data)
    weights = balanced_weights(data) * len(data)
    params = [p for p in translators.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    per_epoch = math.ceil(len(data) / batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, per_epoch * epochs) / (per_epoch * epochs)))
    )
    generator = torch.Generator().manual_seed(seed)
    trained_layers = range(data.n_layers - 1)
    losses = []
    bar = tqdm(range(epochs), desc=f"tuned lens ({translators.kind})", disable=not progress)
    for _ in bar:
        order = torch.randperm(len(data), generator=generator)
        total = 0.0
        for start in range(0, len(data), batch_size):
            rows = order[start : start + batch_size]
            loss = sum(
                (
                    kl_to_target(
                        logit_lens_logits(model, translators(data.resid[rows, layer], layer, data.step[rows])),
                        target[rows],
                    )
                    * weights[rows]
                ).mean()
                for layer in trained_layers
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(rows)
        losses.append(total / len(data) / max(len(trained_layers), 1))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return losses
