"""Wrong answers of a toy model, diffusion or autoregressive: what `evaluate --errors` lists."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class WrongAnswer:
    prompt: str
    output: str
    answer: str


def format_wrong_answers(scores: dict) -> str:
    """Every wrong answer, by task: `prompt -> output (answer: ...)`, for reading what a model gets wrong.
    `scores` maps tasks to scores with `task`, `n` and `wrong` (a list of `WrongAnswer`)."""
    lines = []
    for score in scores.values():
        lines.append(f"{score.task}: {len(score.wrong)} wrong of {score.n}")
        lines += [f"  {w.prompt} -> {w.output!r} (answer: {w.answer!r})" for w in score.wrong]
    return "\n".join(lines)
