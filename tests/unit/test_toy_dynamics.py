"""The organism's measures (#34) on hand-built traces with known answers, and on the toy against its traces."""

from __future__ import annotations

import pytest
import torch
from traces import make_trace

from diffusionlens.analysis import answer_mask
from diffusionlens.sampling.noise import RowReplayNoise
from diffusionlens.toy.dynamics import (
    RunDynamics,
    TaskDynamics,
    canvas_commit_steps,
    denoising_dynamics,
    format_dynamics,
    pooled_late_commit_share,
    run_dynamics,
)
from diffusionlens.toy.tasks import make_dataset


def _steps_by_position(columns: list[list[int]]) -> torch.Tensor:
    """`[step, 1, canvas]` from one list of per-step values per position."""
    return torch.tensor(columns).T[:, None, :]


def test_canvas_commit_is_the_first_step_held_to_the_stop():
    # Position 0: accepted with its final token from step 0. Position 1: accepted from step 1. Position 2:
    # accepted at step 0 with a token later replaced (a correction), then from step 2. Position 3: never
    # accepted before the stop (step 2): it commits at the stop.
    argmax = _steps_by_position([[5, 5, 5], [6, 6, 6], [7, 8, 8], [9, 9, 9]])
    next_canvas = _steps_by_position([[5, 5, 5], [1, 6, 6], [7, 3, 8], [2, 4, 9]])
    accepted = _steps_by_position([[1, 1, 1], [0, 1, 1], [1, 0, 1], [0, 0, 0]]).bool()
    trace = make_trace(argmax, next_canvas=next_canvas, accepted=accepted, sampled=next_canvas)
    assert canvas_commit_steps(trace).tolist() == [[0, 1, 2, 2]]
    (run,) = run_dynamics(trace, torch.tensor([[True, True, True, False]]))
    assert run.steps == 3 and run.commit_steps == [0, 1, 2] and run.late_commits == 2
    assert run.corrections == 1  # position 2's accepted 7 was replaced by 8


def test_steps_after_a_row_stops_are_not_read():
    argmax = _steps_by_position([[5, 5, 5], [6, 6, 7]])
    accepted = _steps_by_position([[1, 1, 0], [0, 1, 0]]).bool()
    finished = torch.tensor([[False], [True], [True]])  # stopped after step 1
    trace = make_trace(argmax, next_canvas=argmax.clone(), accepted=accepted, finished=finished)
    assert canvas_commit_steps(trace).tolist() == [[0, 1]]
    assert run_dynamics(trace, torch.ones(1, 2, dtype=torch.bool))[0].steps == 2


def test_task_summaries():
    runs = [RunDynamics(2, [0, 0, 1], 0), RunDynamics(6, [0, 3], 2), RunDynamics(4, [1], 0)]
    d = TaskDynamics("squares", runs)
    assert d.mean_steps == 4 and d.steps_histogram == {2: 1, 4: 1, 6: 1}
    assert d.late_commit_share == 3 / 6 and d.correction_rate == 1 / 3
    assert d.commit_step_by_position() == [1 / 3, 1.5, 1.0]


def test_the_pooled_late_commit_share_counts_every_position_once():
    long = TaskDynamics("squares", [RunDynamics(3, [0, 1, 1, 2, 0, 0, 0, 0], 0)])  # 3 of 8 late
    short = TaskDynamics("addition", [RunDynamics(2, [1, 1], 0)])  # 2 of 2 late
    dynamics = {"squares": long, "addition": short}
    assert pooled_late_commit_share(dynamics) == 5 / 10  # not the mean of 3/8 and 1
    assert format_dynamics(dynamics).splitlines()[-1] == "| all tasks, pooled | | | 50% | |"


def test_tasks_with_several_answers_are_measured_and_unknown_tasks_refused(toy):
    dynamics = denoising_dynamics(toy, ["pick"], prompts_per_task=1, seeds=[0], progress=False)
    assert len(dynamics["pick"].runs) == 1
    with pytest.raises(ValueError, match="pick"):
        denoising_dynamics(toy, ["picks"], progress=False)


def test_the_toy_measured_from_its_own_traces(toy):
    dynamics = denoising_dynamics(toy, ["squares"], prompts_per_task=2, seeds=[0, 1], progress=False)
    runs = dynamics["squares"].runs
    assert len(runs) == 4
    # The same runs, generated one at a time, give the same steps and commit steps.
    prompts = [example.prompt for example in make_dataset("squares", 2, 2026, split="eval").examples]
    for (seed, prompt), run in zip([(s, p) for s in (0, 1) for p in prompts], runs, strict=True):
        result = toy.generate(
            toy.to_tokens(prompt), noise=RowReplayNoise([seed]), progress=False, max_new_tokens=toy.cfg.canvas_length
        )
        trace = result.trace.canvases[0]
        answer = answer_mask(trace, toy.cfg.eos_token_id)
        assert run.steps == int(trace.stop_step()[0]) + 1
        assert run.commit_steps == canvas_commit_steps(trace)[0][answer[0]].tolist()


def test_summary_and_figure_of_the_card(tmp_path):
    from diffusionlens.toy.dynamics import dynamics_summary
    from diffusionlens.viz.dynamics import plot_denoising_dynamics

    runs = [RunDynamics(2, [0, 0, 1], 0), RunDynamics(6, [0, 3], 2)]
    dynamics = {"squares": TaskDynamics("squares", runs), "sort": TaskDynamics("sort", runs[:1])}
    summary = dynamics_summary(dynamics)
    assert summary["squares"]["steps_histogram"] == {"2": 1, "6": 1}
    assert summary["squares"]["commit_step_by_position"] == [0.0, 1.5, 1.0]
    assert summary["sort"]["mean_steps"] == 2 and summary["sort"]["late_commit_share"] == 1 / 3
    figure = plot_denoising_dynamics(dynamics, title="card")
    steps_axis, commit_axis = figure.axes
    assert len(commit_axis.lines) == 2 and [t.get_text() for t in steps_axis.get_legend().get_texts()] == [
        "squares",
        "sort",
    ]
    figure.savefig(tmp_path / "card.png")
    with pytest.raises(ValueError, match="no tasks"):
        plot_denoising_dynamics({})
