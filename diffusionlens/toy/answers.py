"""Scores and wrong answers of a toy model, diffusion or autoregressive: what `evaluate --errors` lists."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from diffusionlens.toy.tasks import ToyDataset, task_of


@dataclass
class WrongAnswer:
    prompt: str
    output: str
    answer: str


@dataclass
class ScoredTask:
    """Exact match on `n` held-out problems of one task. Each evaluator's score adds its cost per problem
    (denoising steps, generated tokens) and the wrong answers."""

    task: str
    n: int
    exact_match: float


def wrong_answers(data: ToyDataset, outputs: Sequence[str]) -> list[WrongAnswer]:
    """The problems of `data` whose output (`outputs`: one per problem, in `data`'s order) is not a right
    answer (`Task.is_correct`: the answer, or any valid one for a task with several), in problem order."""
    if len(outputs) != len(data.prompts):
        raise ValueError(f"{len(outputs)} outputs for {len(data.prompts)} problems: give one output per problem")
    return [
        WrongAnswer(prompt, output, answer)
        for prompt, output, answer in zip(data.prompts, outputs, data.answers, strict=True)
        if not task_of(prompt).is_correct(prompt, output)
    ]


def format_wrong_answers(scores: dict) -> str:
    """Every wrong answer, by task: `prompt -> output (answer: ...)`, for reading what a model gets wrong.
    `scores` maps tasks to `ScoredTask`s with a `wrong` list of `WrongAnswer`."""
    lines = []
    for score in scores.values():
        lines.append(f"{score.task}: {len(score.wrong)} wrong of {score.n}")
        lines += [f"  {w.prompt} -> {w.output!r} (answer: {w.answer!r})" for w in score.wrong]
    return "\n".join(lines)
