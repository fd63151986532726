"""The toy's autoregressive twin: exact-match evaluation with greedy decoding, on the same held-out
problems (`make_dataset(task, n, seed, split="eval")`) as the diffusion toy's `evaluate`.

    python -m diffusionlens.toy.twin --model toy-ar --n 200
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from diffusionlens.causal_lm import HookedGemma4CausalLM
from diffusionlens.toy.answers import ScoredTask, WrongAnswer, format_wrong_answers, wrong_answers
from diffusionlens.toy.tasks import TASKS, make_dataset
from diffusionlens.toy.tokenizer import CANVAS_LENGTH, build_tokenizer, decode_canvas, encode_prompt


@dataclass
class ARTaskScore(ScoredTask):
    mean_new_tokens: float  # forward passes per problem (one per generated token, eos included)
    wrong: list[WrongAnswer] = field(default_factory=list)


def evaluate_ar(
    model: HookedGemma4CausalLM,
    tokenizer=None,
    *,
    tasks: list[str] | None = None,
    n: int = 200,
    seed: int = 12345,
    max_new_tokens: int = CANVAS_LENGTH,
    progress: bool = False,
) -> dict[str, ARTaskScore]:
    """Per task: exact match of the greedy continuation (cut at eos) against the answer.

    Prompts are batched by length, so no row is padded (see `HookedGemma4CausalLM.generate`)."""
    tokenizer = tokenizer or model.tokenizer or build_tokenizer()
    scores = {}
    for task in tqdm(tasks or list(TASKS), desc="evaluate-ar", disable=not progress):
        data = make_dataset(task, n, seed=seed, split="eval")
        by_length: dict[int, list[int]] = defaultdict(list)
        prompts = [encode_prompt(tokenizer, p) for p in data.prompts]
        for i, ids in enumerate(prompts):
            by_length[len(ids)].append(i)
        outputs, new_tokens = [""] * n, 0
        for rows in by_length.values():
            ids = torch.tensor([prompts[i] for i in rows], device=next(model.parameters()).device)
            with torch.inference_mode():
                out = model.generate(ids, max_new_tokens)
            for row, i in enumerate(rows):
                generated = out[row, ids.shape[1] :].tolist()
                outputs[i] = decode_canvas(tokenizer, generated)  # problem order, not batch order
                eos = tokenizer.eos_token_id
                new_tokens += generated.index(eos) + 1 if eos in generated else len(generated)
        wrong = wrong_answers(data, outputs)
        scores[task] = ARTaskScore(task, n, (n - len(wrong)) / n, new_tokens / n, wrong)
    return scores


def quick_eval_ar(model: HookedGemma4CausalLM, n: int = 50, seed: int = 0) -> dict[str, float]:
    """Exact match per task on a few held-out prompts, for logging during training."""
    return {k: round(v.exact_match, 3) for k, v in evaluate_ar(model, n=n, seed=seed).items()}


def format_table(scores: dict[str, ARTaskScore]) -> str:
    lines = ["| task | n | exact match | mean tokens generated |", "|---|---|---|---|"]
    lines += [f"| {s.task} | {s.n} | {100 * s.exact_match:.1f}% | {s.mean_new_tokens:.1f} |" for s in scores.values()]
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "python -m diffusionlens.toy.twin") -> None:
    parser = argparse.ArgumentParser(prog=prog, description="Exact match of the autoregressive twin, greedy.")
    parser.add_argument("--model", default="toy-ar", help="'toy-ar' (the shipped twin) or a checkpoint directory")
    parser.add_argument("--n", type=int, default=200, help="problems per task")
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--errors", action="store_true", help="also list every wrong answer")
    args = parser.parse_args(argv)
    model = HookedGemma4CausalLM.from_pretrained(args.model, progress=False)
    scores = evaluate_ar(model, n=args.n, seed=args.seed, progress=not args.no_progress)
    print(format_table(scores))
    if args.errors:
        print(format_wrong_answers(scores))


if __name__ == "__main__":
    main()
