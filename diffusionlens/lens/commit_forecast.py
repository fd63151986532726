"""Commit forecasting: from step-s activations, when will each canvas position commit?

A forecasting row is an answer position (up to the final eos) of a run at a step s at or before the step at
which it commits (`StepResiduals.commit_step`: accepted holding its final token from then on); its label is
the number of steps still to go, `commit_step - s` (0: it commits at this step, so it will not change again).
One multinomial logistic probe per decoder layer reads `hook_resid_post` at that layer (standardised, plus a
one-hot of the step), trained on one set of runs and scored on another (split by prompt). Reported per layer:
the share of rows whose predicted commit step lies within `tolerance` steps of the true one, the exact
share, and the accuracy of "will it still change" (steps to go > 0), each against the majority class.

What the probe reads is tested by a second probe on one feature only: the entropy of the model's own output
distribution at that position and step (what the sampler's acceptance rule itself reads). When the
one-feature probe does as well, the residual adds nothing the sampler's confidence does not already say.

    python -m diffusionlens.lens.commit_forecast --model toy --train-prompts 300 --test-prompts 128
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int

from diffusionlens.analysis.logit_lens import logit_lens_logits
from diffusionlens.lens.harvest import StepResiduals, harvest_residuals

if TYPE_CHECKING:
    from diffusionlens.model import HookedDiffusionGemma


def forecast_rows(data: StepResiduals) -> Int[torch.Tensor, " n"]:
    """Indices of the rows to forecast: answer positions at steps up to their commit step."""
    return (data.in_answer & (data.step <= data.commit_step)).nonzero().flatten()


def output_entropy(model: HookedDiffusionGemma, data: StepResiduals) -> Float[torch.Tensor, " rows"]:
    """Entropy of the model's own output distribution at every row (from the last layer's residual)."""
    with torch.no_grad():
        log_p = torch.log_softmax(logit_lens_logits(model, data.resid[:, -1]).float(), -1).cpu()
    return -(log_p.exp() * log_p).sum(-1)


@dataclass
class ForecastScores:
    """Per layer: `within` (|predicted - true commit step| <= tolerance), `exact`, `will_change` accuracy;
    the same for the entropy-only probe and for the majority class; rows scored."""

    tolerance: int
    within: list[float]
    exact: list[float]
    will_change: list[float]
    entropy_within: float
    entropy_will_change: float
    majority_within: float
    majority_will_change: float
    n_train: int
    n_test: int
    steps_to_go_histogram: dict[int, int]

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def fit_multinomial(
    x: Float[torch.Tensor, "n f"], y: Int[torch.Tensor, " n"], classes: int, l2: float = 1e-3, iters: int = 200
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and bias of an L2-regularised multinomial logistic regression (L-BFGS, deterministic)."""
    weight = torch.zeros(x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def features(
    resid: torch.Tensor, steps: torch.Tensor, n_steps: int, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    return torch.cat(
        [(resid - mean) / std, torch.nn.functional.one_hot(steps.clamp(max=n_steps - 1), n_steps).float()], -1
    )


def forecast_commits(
    model: HookedDiffusionGemma, train: StepResiduals, test: StepResiduals, *, tolerance: int = 2, max_to_go: int = 15
) -> ForecastScores:
    """Train the per-layer probes on `train`'s forecasting rows and score them on `test`'s (see the module
    docstring). Steps to go beyond `max_to_go` share one class."""
    train_rows, test_rows = forecast_rows(train), forecast_rows(test)
    if len(train_rows) == 0 or len(test_rows) == 0:
        raise ValueError("no forecasting rows: give runs with answer positions")
    y_train = (train.commit_step - train.step)[train_rows].clamp(max=max_to_go)
    y_test = (test.commit_step - test.step)[test_rows].clamp(max=max_to_go)
    classes, n_steps = max_to_go + 1, int(max(train.step.max(), test.step.max())) + 1
    within, exact, change = [], [], []
    for layer in range(train.n_layers):
        x = train.resid[train_rows, layer]
        mean, std = x.mean(0), x.std(0) + 1e-6
        weight, bias = fit_multinomial(features(x, train.step[train_rows], n_steps, mean, std), y_train, classes)
        x_test = features(test.resid[test_rows, layer], test.step[test_rows], n_steps, mean, std)
        predicted = (x_test @ weight + bias).argmax(-1)
        within.append(float(((predicted - y_test).abs() <= tolerance).float().mean()))
        exact.append(float((predicted == y_test).float().mean()))
        change.append(float(((predicted > 0) == (y_test > 0)).float().mean()))
    entropy_train = output_entropy(model, train)[train_rows, None]
    entropy_test = output_entropy(model, test)[test_rows, None]
    mean, std = entropy_train.mean(0), entropy_train.std(0) + 1e-6
    weight, bias = fit_multinomial(
        features(entropy_train, train.step[train_rows], n_steps, mean, std), y_train, classes
    )
    predicted = (features(entropy_test, test.step[test_rows], n_steps, mean, std) @ weight + bias).argmax(-1)
    majority = int(torch.bincount(y_train).argmax())
    return ForecastScores(
        tolerance=tolerance,
        within=within,
        exact=exact,
        will_change=change,
        entropy_within=float(((predicted - y_test).abs() <= tolerance).float().mean()),
        entropy_will_change=float(((predicted > 0) == (y_test > 0)).float().mean()),
        majority_within=float(((majority - y_test).abs() <= tolerance).float().mean()),
        majority_will_change=float(((majority > 0) == (y_test > 0)).float().mean()),
        n_train=len(train_rows),
        n_test=len(test_rows),
        steps_to_go_histogram={int(k): int(v) for k, v in enumerate(torch.bincount(y_test).tolist()) if v},
    )


def forecast_markdown(scores: ForecastScores) -> str:
    lines = [
        f"| layer | commit step within ±{scores.tolerance} | exact | will it still change |",
        "|---|---|---|---|",
    ]
    for layer, (w, e, c) in enumerate(zip(scores.within, scores.exact, scores.will_change, strict=True)):
        lines.append(f"| {layer} | {100 * w:.0f}% | {100 * e:.0f}% | {100 * c:.0f}% |")
    lines.append(
        f"| output entropy only | {100 * scores.entropy_within:.0f}% | | {100 * scores.entropy_will_change:.0f}% |"
    )
    lines.append(
        f"| majority class | {100 * scores.majority_within:.0f}% | | {100 * scores.majority_will_change:.0f}% |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m diffusionlens.lens.commit_forecast", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", default="toy", help="a checkpoint directory or 'toy'")
    parser.add_argument("--train-prompts", type=int, default=300)
    parser.add_argument("--test-prompts", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the scores here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    from diffusionlens.model import HookedDiffusionGemma
    from diffusionlens.toy.tasks import make_dataset

    torch.manual_seed(args.seed)
    model = HookedDiffusionGemma.from_pretrained(args.model, progress=False)
    progress = not args.no_progress
    train = make_dataset(None, args.train_prompts, 4000 + args.seed, split="train", unique=True).prompts
    test = make_dataset(None, args.test_prompts, 3000 + args.seed, split="eval", unique=True).prompts
    scores = forecast_commits(
        model, harvest_residuals(model, train, progress=progress), harvest_residuals(model, test, progress=progress)
    )
    print(forecast_markdown(scores))
    print(f"rows: {scores.n_train} train, {scores.n_test} test; steps to go (test): {scores.steps_to_go_histogram}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(scores.to_dict(), handle, indent=1)


if __name__ == "__main__":
    main()
