"""How a model uses the denoising steps, per task: the measurements behind the organism's targets (#34).

For fresh held-out problems of each task, every prompt with every seed (`RowReplayNoise`, so any run is
reproducible alone), with the given generation settings (default: `GenerationSettings()`):

- steps per run (the step its first canvas stopped at, plus one) and their histogram;
- the share of answer positions (before the first eos of the final canvas) that commit after step 0: a
  position commits at the first step from which, to the run's stop, it is accepted holding its final token
  (`canvas_commit_steps`; the draft's own `CanvasTrace.commit_step` often settles earlier than the canvas);
- the share of runs with a self-correction: an accepted answer token later replaced
  (`find_corrections(mode="accepted")`);
- the mean commit step of each answer position.

    python -m diffusionlens.toy.dynamics --prompts 6 --seeds 16
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Int

from diffusionlens.analysis.commit_order import answer_mask
from diffusionlens.analysis.seeds import generate_over_seeds
from diffusionlens.analysis.self_correction import find_corrections
from diffusionlens.toy.tasks import ALL_TASKS, TASKS, make_dataset, parse_task_names

if TYPE_CHECKING:
    from diffusionlens.model import HookedDiffusionGemma
    from diffusionlens.sampling.trace import CanvasTrace

__all__ = [
    "RunDynamics",
    "canvas_commit_steps",
    "TaskDynamics",
    "denoising_dynamics",
    "dynamics_summary",
    "format_dynamics",
    "pooled_late_commit_share",
    "run_dynamics",
]


@dataclass(frozen=True)
class RunDynamics:
    """One run's (one row's) use of the steps in its first canvas."""

    steps: int
    commit_steps: list[int]  # per answer position, in canvas order
    corrections: int  # accepted answer tokens later replaced

    @property
    def late_commits(self) -> int:
        return sum(step > 0 for step in self.commit_steps)


def canvas_commit_steps(trace: CanvasTrace) -> Int[torch.Tensor, "batch canvas"]:
    """Per position, the first step from which, through its row's stop step, the position is accepted with
    its final token (the run's stop step if it never is before then)."""
    stop = trace.stop_step().cpu()
    steps = torch.arange(trace.n_steps).view(-1, 1, 1)
    held = trace.accepted.cpu() & (trace.next_canvas.cpu() == trace.final.cpu())
    relevant = steps <= stop.view(1, -1, 1)
    not_held = relevant & ~held
    last_not_held = torch.where(not_held, steps, torch.full_like(steps, -1)).amax(0)
    return torch.minimum(last_not_held + 1, stop.view(-1, 1).expand_as(last_not_held))


def run_dynamics(trace: CanvasTrace, answer: Bool[torch.Tensor, "batch canvas"]) -> list[RunDynamics]:
    """Per row of one canvas's trace: steps taken, commit step of each `answer` position, corrections."""
    stop = trace.stop_step().cpu()
    commit = canvas_commit_steps(trace)
    events = find_corrections(trace, mode="accepted", mask=answer)
    per_row = Counter(event.row for event in events)
    return [
        RunDynamics(int(stop[row]) + 1, commit[row][answer[row]].tolist(), per_row[row]) for row in range(len(stop))
    ]


@dataclass(frozen=True)
class TaskDynamics:
    """`runs` runs of one task; see the module docstring for each measure."""

    task: str
    runs: list[RunDynamics] = field(repr=False)

    @property
    def mean_steps(self) -> float:
        return sum(run.steps for run in self.runs) / len(self.runs)

    @property
    def steps_histogram(self) -> dict[int, int]:
        return dict(sorted(Counter(run.steps for run in self.runs).items()))

    @property
    def late_commit_share(self) -> float:
        positions = sum(len(run.commit_steps) for run in self.runs)
        return sum(run.late_commits for run in self.runs) / max(1, positions)

    @property
    def correction_rate(self) -> float:
        return sum(run.corrections > 0 for run in self.runs) / len(self.runs)

    def commit_step_by_position(self) -> list[float]:
        """Mean commit step of answer position i, over the runs whose answer reaches position i."""
        longest = max(len(run.commit_steps) for run in self.runs)
        columns = [[run.commit_steps[i] for run in self.runs if i < len(run.commit_steps)] for i in range(longest)]
        return [sum(column) / len(column) for column in columns]


def denoising_dynamics(
    model: HookedDiffusionGemma,
    tasks: Sequence[str] | None = None,
    *,
    prompts_per_task: int = 6,
    seeds: Iterable[int] = range(16),
    problem_seed: int = 2026,
    progress: bool = True,
    **generate_kwargs: Any,
) -> dict[str, TaskDynamics]:
    """`TaskDynamics` of each task on `prompts_per_task` held-out problems × `seeds`."""
    tasks = list(TASKS) if tasks is None else list(tasks)
    unknown = [task for task in tasks if task not in ALL_TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; the toy's tasks are {list(ALL_TASKS)}")
    seeds = list(seeds)
    eos = model.cfg.eos_token_id
    out = {}
    for task in tasks:
        prompts = [ex.prompt for ex in make_dataset(task, prompts_per_task, problem_seed, split="eval").examples]
        runs: list[RunDynamics] = []
        for batch in generate_over_seeds(model, prompts, seeds, progress=progress, desc=task, **generate_kwargs):
            trace = batch.result.trace.canvases[0]
            runs += run_dynamics(trace, answer_mask(trace, eos))
        out[task] = TaskDynamics(task, runs)
    return out


def pooled_late_commit_share(dynamics: dict[str, TaskDynamics]) -> float:
    """The share of answer positions committing after step 0 over every run of every task (each position
    counts once, so tasks with longer answers weigh more)."""
    runs = [run for d in dynamics.values() for run in d.runs]
    return sum(run.late_commits for run in runs) / max(1, sum(len(run.commit_steps) for run in runs))


def format_dynamics(dynamics: dict[str, TaskDynamics]) -> str:
    """A markdown table: runs, mean steps, late-commit share and correction rate per task, and the late-commit
    share pooled over all answer positions of all tasks."""
    lines = [
        "| task | runs | mean denoising steps | answer positions committing after step 0 "
        "| runs with a self-correction |",
        "|---|---|---|---|---|",
    ]
    for d in dynamics.values():
        lines.append(
            f"| {d.task} | {len(d.runs)} | {d.mean_steps:.1f} | {100 * d.late_commit_share:.0f}% | "
            f"{100 * d.correction_rate:.0f}% |"
        )
    lines.append(f"| all tasks, pooled | | | {100 * pooled_late_commit_share(dynamics):.0f}% | |")
    return "\n".join(lines)


def dynamics_summary(dynamics: dict[str, TaskDynamics]) -> dict[str, dict[str, Any]]:
    """Per task, the card's numbers as plain JSON values: runs, mean steps, steps histogram, late-commit
    share, correction rate and mean commit step by answer position."""
    return {
        task: {
            "runs": len(d.runs),
            "mean_steps": d.mean_steps,
            "steps_histogram": {str(k): v for k, v in d.steps_histogram.items()},
            "late_commit_share": d.late_commit_share,
            "correction_rate": d.correction_rate,
            "commit_step_by_position": d.commit_step_by_position(),
        }
        for task, d in dynamics.items()
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diffusionlens.toy.dynamics", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="toy", help="a checkpoint directory or 'toy'")
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--tasks", default="", help="comma-separated tasks (default: the toy's four)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--json", default=None, help="also write the per-task figures here (JSON)")
    parser.add_argument("--figure", default=None, help="also draw the steps histogram and commit steps here (PNG)")
    args = parser.parse_args(argv)
    tasks = parse_task_names(args.tasks)  # before the model loads
    from diffusionlens.model import HookedDiffusionGemma

    model = HookedDiffusionGemma.from_pretrained(args.model, progress=False)
    dynamics = denoising_dynamics(
        model,
        tasks,
        prompts_per_task=args.prompts,
        seeds=range(args.seeds),
        progress=not args.no_progress,
    )
    print(format_dynamics(dynamics))
    for d in dynamics.values():
        print(f"{d.task}: steps histogram {d.steps_histogram}")
    if args.json:
        Path(args.json).write_text(json.dumps(dynamics_summary(dynamics), indent=1))
    if args.figure:
        from diffusionlens.viz.dynamics import plot_denoising_dynamics

        plot_denoising_dynamics(dynamics, title=f"{args.model}: denoising dynamics").savefig(args.figure, dpi=120)


if __name__ == "__main__":
    main()
