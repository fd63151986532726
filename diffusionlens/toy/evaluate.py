"""Exact-match evaluation of a toy model on fresh held-out problems, with the default sampler.

python -m diffusionlens.toy.evaluate --model toy --n 200
python -m diffusionlens.toy.evaluate --model toy --n 200 --seed 12345 1 2 3   # per seed and pooled
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from diffusionlens.model import HookedDiffusionGemma
from diffusionlens.sampling.bottleneck import TokenBottleneck
from diffusionlens.sampling.noise import ReplayNoise
from diffusionlens.toy.answers import ScoredTask, WrongAnswer, format_wrong_answers, wrong_answers
from diffusionlens.toy.data import make_batch
from diffusionlens.toy.tasks import TASKS, make_dataset, parse_task_names
from diffusionlens.toy.tokenizer import CANVAS_LENGTH, decode_canvas


@dataclass
class TaskScore(ScoredTask):
    mean_steps: float  # denoising steps per problem
    wrong: list[WrongAnswer] = field(default_factory=list)


def evaluate(
    model: HookedDiffusionGemma,
    tokenizer=None,
    *,
    tasks: list[str] | None = None,
    n: int = 200,
    seed: int = 12345,
    batch_size: int = 100,
    progress: bool = False,
    **generate_kwargs,
) -> dict[str, TaskScore]:
    """Per task: exact match of the decoded canvas against the answer, over `n` held-out prompts, and
    the mean number of denoising steps used. Sampling uses `ReplayNoise(seed)` unless given `noise`."""
    tokenizer = tokenizer or model.tokenizer
    scores = {}
    for task in tasks or list(TASKS):
        data = make_dataset(task, n, seed=seed, split="eval")
        outputs, steps = [], 0.0
        for start in range(0, n, batch_size):
            chunk = data.examples[start : start + batch_size]
            batch = make_batch(tokenizer, chunk, CANVAS_LENGTH)
            kwargs = {"noise": ReplayNoise(seed + start), "max_new_tokens": CANVAS_LENGTH, **generate_kwargs}
            with torch.inference_mode():
                result = model.generate(
                    batch["input_ids"], attention_mask=batch["attention_mask"], progress=progress, **kwargs
                )
            canvas = result.sequences[:, batch["input_ids"].shape[1] :][:, :CANVAS_LENGTH]
            outputs += [decode_canvas(tokenizer, row.tolist()) for row in canvas]
            steps += float(result.trace[0].stop_step().float().add(1).sum())
        wrong = wrong_answers(data, outputs)
        scores[task] = TaskScore(task, n, (n - len(wrong)) / n, steps / n, wrong)
    return scores


def pooled(by_seed: dict[int, dict[str, TaskScore]]) -> dict[str, TaskScore]:
    """One score per task over every seed's problems (means weighted by each seed's `n`)."""
    runs = list(by_seed.values())
    if not runs:
        raise ValueError("pooled needs the scores of at least one seed")
    out = {}
    for task in runs[0]:
        parts = [run[task] for run in runs]
        n = sum(p.n for p in parts)
        exact = sum(p.exact_match * p.n for p in parts) / n
        wrong = [w for p in parts for w in p.wrong]
        out[task] = TaskScore(task, n, exact, sum(p.mean_steps * p.n for p in parts) / n, wrong)
    return out


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (stays inside [0, 1] near 100%)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def format_seed_table(by_seed: dict[int, dict[str, TaskScore]]) -> str:
    """Exact match per task for each seed, then pooled over all seeds with a 95% Wilson interval."""
    total = pooled(by_seed)
    seeds = list(by_seed)
    header = "| task | " + " | ".join(f"seed {s}" for s in seeds) + " | pooled (n) | 95% interval | mean steps |"
    lines = [header, "|---" * (len(seeds) + 4) + "|"]
    for task, score in total.items():
        cells = " | ".join(f"{100 * by_seed[s][task].exact_match:.1f}%" for s in seeds)
        low, high = wilson_interval(score.exact_match * score.n, score.n)
        lines.append(
            f"| {task} | {cells} | {100 * score.exact_match:.1f}% ({score.n}) | "
            f"{100 * low:.1f}–{100 * high:.1f}% | {score.mean_steps:.1f} |"
        )
    return "\n".join(lines)


def quick_eval(model: HookedDiffusionGemma, tokenizer, n: int = 64, seed: int = 0) -> dict[str, float]:
    """Exact match per task on a few held-out prompts, for logging during training."""
    return {k: round(v.exact_match, 3) for k, v in evaluate(model, tokenizer, n=n, seed=seed).items()}


def format_table(scores: dict[str, TaskScore]) -> str:
    lines = ["| task | n | exact match | mean steps |", "|---|---|---|---|"]
    lines += [f"| {s.task} | {s.n} | {100 * s.exact_match:.1f}% | {s.mean_steps:.1f} |" for s in scores.values()]
    return "\n".join(lines)


BOTTLENECKS = [
    None,
    *(TokenBottleneck(top_k=k) for k in (1, 2, 4, 8, 16)),
    *(TokenBottleneck(top_p=p) for p in (0.5, 0.9, 0.99)),
]


def bottleneck_table(model: HookedDiffusionGemma, *, n: int = 100, seed: int = 12345, progress: bool = True) -> str:
    """Exact match per task and mean steps with no bottleneck and each top-k / top-p bottleneck."""
    tasks = list(TASKS)
    lines = ["| self-conditioning | " + " | ".join(tasks) + " | mean steps |", "|---" * (len(tasks) + 2) + "|"]
    for bottleneck in tqdm(BOTTLENECKS, desc="bottlenecks", disable=not progress):
        scores = evaluate(model, n=n, seed=seed, bottleneck=bottleneck)
        steps = sum(s.mean_steps for s in scores.values()) / len(scores)
        cells = " | ".join(f"{100 * scores[t].exact_match:.1f}%" for t in tasks)
        lines.append(f"| {bottleneck or 'full logits'} | {cells} | {steps:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "diffusionlens evaluate") -> None:
    parser = argparse.ArgumentParser(prog=prog, description="Exact match of a toy model on held-out problems.")
    parser.add_argument(
        "--model",
        default="toy",
        help="'toy' (the shipped model), 'toy-ar' (its autoregressive twin, greedy) or a checkpoint directory",
    )
    parser.add_argument("--n", type=int, default=200, help="problems per task")
    parser.add_argument(
        "--seed",
        type=int,
        nargs="+",
        default=[12345],
        help="one or more seeds; several print a pooled table (--bottlenecks uses the first)",
    )
    parser.add_argument("--bottlenecks", action="store_true", help="also sweep the token bottleneck settings")
    parser.add_argument("--errors", action="store_true", help="also list every wrong answer")
    parser.add_argument("--tasks", default="", help="comma-separated tasks to score (default: the toy's four)")
    args = parser.parse_args(argv)
    tasks = parse_task_names(args.tasks)  # before the model loads
    if _is_causal_lm(args.model):
        from diffusionlens.toy.twin import main as twin_main

        if len(args.seed) > 1 or args.bottlenecks or tasks:
            parser.error("an autoregressive model takes one --seed, no --bottlenecks and no --tasks")
        twin_main(["--model", args.model, "--n", str(args.n), "--seed", str(args.seed[0])] + ["--errors"] * args.errors)
        return
    model = HookedDiffusionGemma.from_pretrained(args.model, progress=False)
    by_seed = {seed: evaluate(model, tasks=tasks, n=args.n, seed=seed) for seed in args.seed}
    print(format_table(by_seed[args.seed[0]]) if len(args.seed) == 1 else format_seed_table(by_seed))
    if args.errors:
        print(format_wrong_answers(pooled(by_seed)))
    if args.bottlenecks:
        print(bottleneck_table(model, n=args.n, seed=args.seed[0]))


def _is_causal_lm(model: str) -> bool:
    """True for the shipped twin or a directory whose config.json is a Gemma 4 causal LM."""
    import json
    from pathlib import Path

    from diffusionlens.weights.checkpoint import SHIPPED_CHECKPOINTS

    path = Path(SHIPPED_CHECKPOINTS.get(model, model)) / "config.json"
    return path.exists() and json.loads(path.read_text()).get("model_type") == "gemma4_text"


if __name__ == "__main__":
    main()
