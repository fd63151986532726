"""Monitorability on the toy tasks: from what a run has shown so far, can a simple monitor tell whether
its final answer will be wrong, and what that answer will be?

The monitor reads the tokens an observer sees after each unit of compute: for the diffusion toy the draft
(argmax canvas) after each denoising step, for the autoregressive twin the answer written so far after each
generated token. Two readings of the same record:

- `check`: the readout is checked with the task's own solver (a string match: the draft solves the
  problem; the twin's prefix is a prefix of the correct answer). Its AUROC against final correctness says
  how early an observer who only reads tokens can see where the run is going.
- `confidence`: no solver, only the model's own uncertainty: the largest entropy of the answer tokens read
  so far (the draft's, up to its eos; the twin's, token by token).

`diffusion_monitor_run` / `twin_monitor_run` record both models on the same held-out problems;
`monitor_scores` and `answer_readout` read them at any fraction of each run's compute (steps taken / steps
the run took; tokens generated / tokens the run generated, eos included).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float, Int
from tqdm.auto import tqdm

from diffusionlens.analysis.transparency import auroc
from diffusionlens.model import HookedDiffusionGemma
from diffusionlens.sampling.noise import ReplayNoise
from diffusionlens.sampling.sampler import entropy
from diffusionlens.sampling.settings import settings_of
from diffusionlens.toy.data import make_batch
from diffusionlens.toy.tasks import SEVERAL_ANSWER_TASKS, TASKS, Example, make_dataset, task_of
from diffusionlens.toy.tokenizer import CANVAS_LENGTH, decode_canvas, encode_prompt

MONITORS = ("check", "confidence")


@dataclass
class MonitorRun:
    """One model's runs on held-out problems, and what an observer could read after each unit of compute.

    Per problem i: `units[i]` units of compute (denoising steps taken, or tokens generated with eos), and
    for u = 1 … units[i] (list index u - 1) the readout after u units: whether it is consistent with the
    correct answer (`check`), the largest entropy over its answer tokens (`max_entropy`), the share of the
    final answer's tokens (eos included) it already has at the right position (`agreement`), and whether it
    is the final answer, complete (`exact`). The readout after the last unit is the final answer."""

    kind: str  # "diffusion" or "twin"
    tasks: list[str]
    prompts: list[str]
    answers: list[str]  # the correct answers
    finals: list[str]  # the model's final answers
    check: list[list[bool]] = field(default_factory=list)
    max_entropy: list[list[float]] = field(default_factory=list)
    agreement: list[list[float]] = field(default_factory=list)
    exact: list[list[bool]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def units(self) -> Int[torch.Tensor, " problem"]:
        return torch.tensor([len(c) for c in self.check])

    @property
    def wrong(self) -> Bool[torch.Tensor, " problem"]:
        """Whether each final answer is wrong (the positive class of the monitors' AUROC)."""
        rows = zip(self.tasks, self.prompts, self.finals, self.answers, strict=True)
        return torch.tensor([not _is_right(task, prompt, final, answer) for task, prompt, final, answer in rows])

    def subset(self, keep: Sequence[int]) -> MonitorRun:
        """The runs of the problems `keep` (e.g. one task's)."""
        pick = list(keep)
        lists = ("tasks", "prompts", "answers", "finals", "check", "max_entropy", "agreement", "exact")
        return MonitorRun(self.kind, **{name: [getattr(self, name)[i] for i in pick] for name in lists})


def units_at_fractions(run: MonitorRun, fractions: Sequence[float]) -> Int[torch.Tensor, "fraction problem"]:
    """Units of compute spent at each fraction of each run: floor(f × units), the readout an observer
    has once that share of the run's compute is spent (0: nothing computed yet)."""
    total = run.units.double()
    f = torch.tensor([float(x) for x in fractions], dtype=torch.double)
    if len(f) and (f.min() < 0 or f.max() > 1):
        raise ValueError(f"fractions must lie in [0, 1], got {list(fractions)}")
    return torch.floor(f[:, None] * total[None, :] + 1e-9).long()


def _gather(values: list[list], units: Int[torch.Tensor, "fraction problem"], empty: float) -> torch.Tensor:
    out = torch.full(units.shape, float(empty), dtype=torch.double)
    for i, per_unit in enumerate(values):
        for row, u in enumerate(units[:, i].tolist()):
            if u > 0:
                out[row, i] = float(per_unit[min(u, len(per_unit)) - 1])
    return out


def monitor_scores(
    run: MonitorRun, units: Int[torch.Tensor, "fraction problem"], monitor: str
) -> Float[torch.Tensor, "fraction problem"]:
    """Suspicion that the final answer will be wrong, from the readout after `units` units of compute
    (`units_at_fractions`; u is capped at the run's length): `check` 1 if the readout is not consistent
    with the correct answer, else 0; `confidence` the largest answer-token entropy. Before any compute
    (u = 0) every problem gets the same score, so the AUROC there is 0.5."""
    if monitor == "check":
        return 1.0 - _gather(run.check, units, 0.5)
    if monitor == "confidence":
        return _gather(run.max_entropy, units, 0.0)
    raise ValueError(f"monitor must be one of {MONITORS}, got {monitor!r}")


def answer_readout(
    run: MonitorRun, units: Int[torch.Tensor, "fraction problem"]
) -> dict[str, Float[torch.Tensor, "fraction problem"]]:
    """What the readout says about the final answer: `agreement` (share of its tokens already right at
    their position) and `exact` (1 if the readout is the final answer, complete)."""
    return {"agreement": _gather(run.agreement, units, 0.0), "exact": _gather(run.exact, units, 0.0)}


def _is_right(task: str, prompt: str, final: str, answer: str) -> bool:
    several = SEVERAL_ANSWER_TASKS.get(task)
    return several.is_correct(prompt, final) if several is not None else final == answer


def _consistent(text: str, prompt: str, complete: bool) -> bool:
    """Whether a readout is a right answer (`complete`) or the start of one (any right answer, for a task with
    several)."""
    task = task_of(prompt)
    return task.is_correct(prompt, text) if complete else task.can_extend(prompt, text)


def _answer_length(tokens: list[int], eos: int) -> int:
    """Tokens of an answer up to and including its first eos (all of them if there is none)."""
    return tokens.index(eos) + 1 if eos in tokens else len(tokens)


def diffusion_monitor_run(
    model: HookedDiffusionGemma,
    *,
    n: int = 100,
    seed: int = 777,
    tasks: Sequence[str] | None = None,
    examples: Sequence[Example] | None = None,
    batch_size: int = 100,
    progress: bool = False,
    **generate_kwargs,
) -> MonitorRun:
    """Generate `n` held-out problems per task (or `examples`; noise `ReplayNoise(seed + batch start)`,
    batches within one task) and record, after each denoising step a row took, what its draft shows
    (`generate_kwargs` go to `generate`, e.g. `bottleneck=TokenBottleneck(top_k=1)`)."""
    tokenizer = model.tokenizer
    eos = tokenizer.eos_token_id
    run = MonitorRun("diffusion", [], [], [], [])
    if examples is not None:
        groups = [list(examples)]
    else:
        groups = [make_dataset(task, n, seed=seed, split="eval").examples for task in (tasks or TASKS)]
    bar = tqdm(total=sum(len(g) for g in groups), desc="diffusion runs", disable=not progress)
    for group in groups:
        for start in range(0, len(group), batch_size):
            chunk = group[start : start + batch_size]
            batch = make_batch(tokenizer, chunk, CANVAS_LENGTH)
            kwargs = {"noise": ReplayNoise(seed + start), "max_new_tokens": CANVAS_LENGTH, "progress": False}
            with torch.inference_mode():
                result = model.generate(
                    batch["input_ids"], attention_mask=batch["attention_mask"], **{**kwargs, **generate_kwargs}
                )
            trace = result.trace[0]
            stop = trace.stop_step()
            for row, example in enumerate(chunk):
                final = trace.argmax[int(stop[row]), row].tolist()
                length = _answer_length(final, eos)
                check, max_entropy, agreement, exact = [], [], [], []
                final_text = decode_canvas(tokenizer, final)
                for step in range(int(stop[row]) + 1):
                    draft = trace.argmax[step, row].tolist()
                    text = decode_canvas(tokenizer, draft)
                    check.append(_consistent(text, example.prompt, complete=True))
                    max_entropy.append(float(trace.entropy[step, row, : _answer_length(draft, eos)].max()))
                    agreement.append(sum(d == f for d, f in zip(draft[:length], final[:length], strict=True)) / length)
                    exact.append(text == final_text)
                _append(
                    run, example.task, example.prompt, example.answer, final_text, check, max_entropy, agreement, exact
                )
            bar.update(len(chunk))
    bar.close()
    return run


def twin_monitor_run(
    model,
    *,
    n: int = 100,
    seed: int = 777,
    tasks: Sequence[str] | None = None,
    examples: Sequence[Example] | None = None,
    max_new_tokens: int = CANVAS_LENGTH,
    progress: bool = False,
) -> MonitorRun:
    """Greedy runs of a `HookedGemma4CausalLM` on the same held-out problems as `diffusion_monitor_run`
    (or on `examples`), batched by prompt length so that no row is padded, and, after each token
    generated, what its answer so far shows."""
    tokenizer = model.tokenizer
    eos = tokenizer.eos_token_id
    if examples is not None:
        problems = list(examples)
    else:
        problems = [e for task in (tasks or TASKS) for e in make_dataset(task, n, seed=seed, split="eval").examples]
    prompts = [encode_prompt(tokenizer, e.prompt) for e in problems]
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(prompts):
        by_length[len(ids)].append(i)
    records = {}
    bar = tqdm(total=len(problems), desc="twin runs", disable=not progress)
    for rows in by_length.values():
        ids = torch.tensor([prompts[i] for i in rows], device=model.device)
        with torch.inference_mode():
            out, caches = model.generate_with_cache(ids, max_new_tokens, names_filter="hook_logits")
        token_entropy = torch.stack([entropy(c["hook_logits"][:, -1].float()) for c in caches], dim=1).cpu()
        for row, i in enumerate(rows):
            generated = out[row, ids.shape[1] :].tolist()
            length = _answer_length(generated, eos)
            check, max_entropy, agreement, exact = [], [], [], []
            for u in range(1, length + 1):
                text = decode_canvas(tokenizer, generated[:u])
                check.append(_consistent(text, problems[i].prompt, complete=u == length))  # u == length: over
                max_entropy.append(float(token_entropy[row, :u].max()))
                agreement.append(u / length)
                exact.append(u == length)
            records[i] = (decode_canvas(tokenizer, generated[:length]), check, max_entropy, agreement, exact)
        bar.update(len(rows))
    bar.close()
    run = MonitorRun("twin", [], [], [], [])
    for i, example in enumerate(problems):
        _append(run, example.task, example.prompt, example.answer, *records[i])
    return run


def _append(run: MonitorRun, task, prompt, answer, final, check, max_entropy, agreement, exact) -> None:
    run.tasks.append(task)
    run.prompts.append(prompt)
    run.answers.append(answer)
    run.finals.append(final)
    run.check.append(check)
    run.max_entropy.append(max_entropy)
    run.agreement.append(agreement)
    run.exact.append(exact)


def draft_monitor_auroc(
    model: HookedDiffusionGemma,
    *,
    n: int = 100,
    seed: int = 777,
    tasks: list[str] | None = None,
    batch_size: int = 100,
    **generate_kwargs,
) -> dict[int, float]:
    """AUROC, per step s, of "the step-s draft already solves the problem" as a predictor of "the final
    answer is correct", over `n` held-out problems per task. Rows that stopped before step s keep their
    last draft (what an observer would see)."""
    run = diffusion_monitor_run(model, n=n, seed=seed, tasks=tasks, batch_size=batch_size, **generate_kwargs)
    steps = torch.arange(1, model_steps(generate_kwargs) + 1)[:, None].expand(-1, len(run))
    drafts_ok = 1.0 - monitor_scores(run, steps, "check")
    correct = ~run.wrong
    return {step: auroc(drafts_ok[step], correct) for step in range(drafts_ok.shape[0])}


def model_steps(generate_kwargs: dict) -> int:
    """The step budget these generate keywords give (the default lives in GenerationSettings)."""
    return settings_of(generate_kwargs).max_denoising_steps


def fraction_grid(points: int) -> list[float]:
    """`points` evenly spaced fractions of a run's compute, ending at 1 (the final answer)."""
    if points < 1:
        raise ValueError(f"points must be >= 1, got {points}")
    return [round(k / points, 6) for k in range(1, points + 1)]


def _interval(values: torch.Tensor, level: float) -> list:
    """Percentile interval of bootstrap values along the last axis (NaN resamples left out)."""
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.double)
    return torch.nanquantile(values.double(), q, dim=-1).movedim(0, -1).tolist()


def units_absolute(run: MonitorRun, units: Sequence[int]) -> Int[torch.Tensor, "point problem"]:
    """The same number of units of compute for every problem (capped at each run's length: a run that
    has finished shows its final answer)."""
    if any(u < 0 for u in units):
        raise ValueError(f"units must be >= 0, got {list(units)}")
    return torch.minimum(torch.tensor(list(units))[:, None], run.units[None, :])


def monitor_curves(
    runs: dict[str, MonitorRun],
    fractions: Sequence[float],
    *,
    units: Sequence[int] = (),
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    reference: str | None = None,
) -> dict:
    """Monitor AUROCs and answer readouts of several models' runs on the same problems, against the
    fraction of each run's compute spent, with percentile bootstrap intervals over problems.

    Every run is resampled with the same bootstrap weights (the problems must be the same, in the same
    order), so differences between models are paired: `difference[name][monitor]` is name − `reference`
    (default: the last run) at each fraction. `early` is the mean over the fractions below 1 (what a
    monitor sees before the answer is final). `units`: also the AUROCs after that many units of compute
    for every problem (`by_units`; e.g. 1: the first denoising step against the first token). Returns
    plain lists and floats, ready for JSON."""
    from diffusionlens.analysis.transparency import bootstrap_weights, weighted_auroc

    names = list(runs)
    if not names:
        raise ValueError("give at least one run")
    first = runs[names[0]]
    for name in names[1:]:
        if runs[name].prompts != first.prompts:
            raise ValueError(f"runs {names[0]!r} and {name!r} are not on the same problems in the same order")
    reference = reference if reference is not None else names[-1]
    if reference not in runs:
        raise KeyError(f"reference {reference!r} is not one of the runs {names}")
    fractions = [float(f) for f in fractions]
    early = torch.tensor([f < 1 for f in fractions])
    weights = bootstrap_weights(len(first), n_boot, seed)
    ones = torch.ones(1, len(first), dtype=torch.long)

    def aurocs(run: MonitorRun, at: torch.Tensor, monitor: str) -> tuple[torch.Tensor, torch.Tensor]:
        scores = monitor_scores(run, at, monitor)
        point = torch.stack([weighted_auroc(s, run.wrong, ones)[0] for s in scores])
        return point, torch.stack([weighted_auroc(s, run.wrong, weights) for s in scores])  # [point], [point, boot]

    out: dict = {
        "fractions": fractions,
        "units": list(units),
        "n_problems": len(first),
        "n_boot": n_boot,
        "level": level,
        "models": {},
    }
    boots: dict[str, dict[str, torch.Tensor]] = {}
    for name, run in runs.items():
        wrong = run.wrong
        at = units_at_fractions(run, fractions)
        model: dict = {
            "kind": run.kind,
            "exact_match": float(1 - wrong.double().mean()),
            "n_wrong": int(wrong.sum()),
            "mean_units": float(run.units.double().mean()),
            "monitors": {},
            "readout": {},
            "by_units": {},
        }
        boots[name] = {}
        for monitor in MONITORS:
            point, boot = aurocs(run, at, monitor)
            boots[name][monitor] = boot
            model["monitors"][monitor] = {
                "auroc": point.tolist(),
                "interval": _interval(boot, level),
                "early": float(point[early].mean()) if early.any() else float("nan"),
                "early_interval": _interval(boot[early].mean(0), level) if early.any() else [float("nan")] * 2,
            }
            if units:
                point, boot = aurocs(run, units_absolute(run, units), monitor)
                model["by_units"][monitor] = {"auroc": point.tolist(), "interval": _interval(boot, level)}
        for what, values in answer_readout(run, at).items():
            boot = values @ weights.double().T / len(first)  # [fraction, boot]
            model["readout"][what] = {"mean": values.mean(1).tolist(), "interval": _interval(boot, level)}
        out["models"][name] = model
    out["reference"] = reference
    out["difference"] = {}
    for name in names:
        if name == reference:
            continue
        out["difference"][name] = {}
        for monitor in MONITORS:
            diff = boots[name][monitor] - boots[reference][monitor]
            point = torch.tensor(out["models"][name]["monitors"][monitor]["auroc"]) - torch.tensor(
                out["models"][reference]["monitors"][monitor]["auroc"]
            )
            out["difference"][name][monitor] = {
                "auroc": point.tolist(),
                "interval": _interval(diff, level),
                "early": float(point[early].mean()) if early.any() else float("nan"),
                "early_interval": _interval(diff[early].mean(0), level) if early.any() else [float("nan")] * 2,
            }
    return out


def json_safe(value):
    """NaN (an AUROC with one class, a share with nothing to score) as null, so a results file is strict
    JSON; dicts, lists and tuples are walked."""
    if isinstance(value, float):
        return None if value != value else value
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
