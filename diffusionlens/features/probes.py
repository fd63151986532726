"""Probes by denoising step: how early, and at which layer, a label is decodable from a hook.

One probe per (hook, step), trained on the store's rows of that step, scored on held-out rows.
The split is by prompt, never by row: rows of one prompt (its seeds, steps and positions) are
strongly correlated, and a row-level split would let a probe memorise prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from diffusionlens.features.causal_rows import CausalRows
from diffusionlens.features.store import ActivationStore

Target = str | torch.Tensor | Callable[[dict[str, torch.Tensor]], torch.Tensor]
RowFilter = torch.Tensor | Callable[[dict[str, torch.Tensor]], torch.Tensor] | None


@dataclass
class ProbeResult:
    """Held-out score per hook × step (accuracy for logistic probes, R² for linear ones), the
    majority-class baseline per step (logistic only; NaN for linear), and the split.

    `by` names the label whose values `steps` holds (one probe per value; "step" unless `train_probe`
    was given another). With `keep_predictions`, `predictions[(hook, value)]` is (held-out row indices in
    storage order, the probe's prediction for each)."""

    hooks: list[str]
    steps: list[int]
    score: Float[torch.Tensor, "hook step"]
    baseline: Float[torch.Tensor, " step"]
    n_test: Int[torch.Tensor, " step"]
    kind: str
    test_prompts: list[int] = field(default_factory=list)
    by: str = "step"
    predictions: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def table(self, names: Sequence[str] | None = None) -> str:
        """Markdown: one row per hook, one column per step, then the baseline row."""
        names = list(names) if names is not None else self.hooks
        what = "accuracy" if self.kind == "logistic" else "R²"
        lines = [f"| {what} | " + " | ".join(f"{self.by} {s}" for s in self.steps) + " |"]
        lines.append("|---" * (len(self.steps) + 1) + "|")
        for name, row in zip(names, self.score.tolist(), strict=True):
            lines.append(f"| {name} | " + " | ".join(_cell(v) for v in row) + " |")
        if self.kind == "logistic":
            lines.append("| majority baseline | " + " | ".join(_cell(v) for v in self.baseline.tolist()) + " |")
        lines.append("| held-out rows | " + " | ".join(str(int(n)) for n in self.n_test) + " |")
        return "\n".join(lines)


def _cell(value: float) -> str:
    return "–" if value != value else f"{value:.2f}"  # NaN: no held-out rows at that step


def _resolve(value, labels: dict[str, torch.Tensor], what: str) -> torch.Tensor:
    if isinstance(value, str):
        if value not in labels:
            raise KeyError(f"{what} {value!r} is not a store label; labels: {sorted(labels)}")
        return labels[value]
    return value(labels) if callable(value) else torch.as_tensor(value)


def split_prompts(n_prompts: int, test_fraction: float, seed: int) -> list[int]:
    """Seeded choice of held-out prompt ids (at least one, and at least one left to train on)."""
    if n_prompts < 2:
        raise ValueError("a held-out split by prompt needs at least two prompts in the store")
    order = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed))
    n_test = min(n_prompts - 1, max(1, round(test_fraction * n_prompts)))
    return sorted(order[:n_test].tolist())


def train_probe(
    store: ActivationStore | CausalRows,
    target: Target,
    *,
    hooks: Sequence[str] | None = None,
    rows: RowFilter = None,
    kind: str = "logistic",
    steps: Sequence[int] | None = None,
    test_fraction: float = 0.25,
    seed: int = 0,
    l2: float = 1e-3,
    max_iter: int = 200,
    min_test_rows: int = 10,
    by: str = "step",
    keep_predictions: bool = False,
    progress: bool = True,
) -> ProbeResult:
    """Fit a probe per (hook, step) predicting `target` from the store's rows.

    `target`: a label name (e.g. "final_token"), a `[rows]` tensor, or a function of the labels
    dict. `rows`: a bool mask or a function of the labels selecting rows (e.g. one position).
    `kind`: "logistic" (multinomial, L-BFGS, accuracy) or "linear" (ridge, R²). Features are
    standardised with training-set statistics. Steps with fewer than `min_test_rows` held-out rows
    (late steps that few prompts reach) are left NaN rather than scored on a handful of rows.

    `by`: the label that separates the probes (default "step": one probe per denoising step; any label
    of the store, e.g. "lookahead" for `CausalRows`). `keep_predictions`: keep every held-out row's
    prediction in `ProbeResult.predictions`. `store`: an `ActivationStore`, or `CausalRows` for a
    causal LM (both give `labels()`, `activations(hook)`, `hooks` and `prompts`).
    """
    if kind not in ("logistic", "linear"):
        raise ValueError(f"kind must be 'logistic' or 'linear', got {kind!r}")
    labels = store.labels()
    if not labels:
        raise ValueError(f"{getattr(store, 'path', store)} holds no rows yet; run harvest() first")
    if by not in labels:
        raise KeyError(f"by={by!r} is not a store label; labels: {sorted(labels)}")
    group = labels[by]
    y_all = _resolve(target, labels, "target")
    keep = torch.ones_like(group, dtype=torch.bool) if rows is None else _resolve(rows, labels, "rows").bool()
    if not bool(keep.any()):
        raise ValueError(f"rows= selects none of the store's {len(group)} rows; widen it (e.g. another position)")
    test_prompts = split_prompts(len(store.prompts), test_fraction, seed)
    is_test = torch.isin(labels["prompt_id"], torch.tensor(test_prompts))
    hooks = list(hooks) if hooks is not None else store.hooks
    steps = list(steps) if steps is not None else sorted(set(group[keep].tolist()))
    score = torch.full((len(hooks), len(steps)), float("nan"))
    baseline = torch.full((len(steps),), float("nan"))
    n_test = torch.zeros(len(steps), dtype=torch.long)
    predictions: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
    bar = tqdm(total=len(hooks) * len(steps), desc="probes", disable=not progress)
    for h, hook in enumerate(hooks):
        x_all = store.activations(hook)
        for s, step in enumerate(steps):
            at_step = keep & (group == step)
            train, test = at_step & ~is_test, at_step & is_test
            n_test[s] = int(test.sum())
            if train.sum() == 0 or test.sum() < max(1, min_test_rows):
                bar.update(1)
                continue
            fit = fit_logistic_probe if kind == "logistic" else _fit_ridge
            predicted = fit(x_all[train], y_all[train], x_all[test], l2, max_iter)
            score[h, s] = _accuracy(predicted, y_all[test]) if kind == "logistic" else _r2(predicted, y_all[test])
            if keep_predictions:
                predictions[(hook, step)] = (test.nonzero().flatten(), predicted)
            if kind == "logistic":
                majority = torch.mode(y_all[train]).values
                baseline[s] = float((y_all[test] == majority).float().mean())
            bar.update(1)
    bar.close()
    return ProbeResult(hooks, steps, score, baseline, n_test, kind, test_prompts, by, predictions)


def _standardise(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = train.mean(0), train.std(0, unbiased=False).clamp(min=1e-6)
    return (train - mean) / std, (test - mean) / std


def _accuracy(predicted: torch.Tensor, y_test: torch.Tensor) -> float:
    return float((predicted == y_test).float().mean())


def _r2(predicted: torch.Tensor, y_test: torch.Tensor) -> float:
    y_test = y_test.float()
    residual = (y_test - predicted).pow(2).sum()
    total = (y_test - y_test.mean()).pow(2).sum().clamp(min=1e-12)
    return float(1 - residual / total)


def fit_logistic_probe(
    x_train: Float[torch.Tensor, "train d"],
    y_train: Int[torch.Tensor, " train"],
    x_test: Float[torch.Tensor, "test d"],
    l2: float = 1e-3,
    max_iter: int = 200,
) -> Int[torch.Tensor, " test"]:
    """Held-out predictions (class labels, among those of `y_train`) of a multinomial logistic probe fitted by
    L-BFGS on the standardised `x_train` (training-set statistics) with an L2 penalty `l2`."""
    x_train, x_test = _standardise(x_train.float(), x_test.float())
    classes, y_index = torch.unique(y_train, return_inverse=True)
    weight = torch.zeros(x_train.shape[1], len(classes), requires_grad=True)
    bias = torch.zeros(len(classes), requires_grad=True)
    optimiser = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        logits = x_train @ weight + bias
        loss = torch.nn.functional.cross_entropy(logits, y_index) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimiser.step(closure)
    with torch.no_grad():
        return classes[(x_test @ weight + bias).argmax(-1)]


def _fit_ridge(x_train, y_train, x_test, l2: float, max_iter: int) -> torch.Tensor:
    """Held-out predictions of a ridge regression."""
    x_train, x_test = _standardise(x_train.float(), x_test.float())
    y_train = y_train.float()
    y_mean = y_train.mean()
    gram = x_train.T @ x_train + l2 * len(x_train) * torch.eye(x_train.shape[1])
    weight = torch.linalg.solve(gram, x_train.T @ (y_train - y_mean))
    return x_test @ weight + y_mean
