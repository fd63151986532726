"""The model card's figure of how a model uses the denoising steps, per task (`toy.dynamics` measures it)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from diffusionlens.viz._common import finish_panels, pyplot

if TYPE_CHECKING:
    from diffusionlens.toy.dynamics import TaskDynamics


def plot_denoising_dynamics(dynamics: dict[str, TaskDynamics], title: str = ""):
    """Two panels: the histogram of denoising steps per run, and the mean commit step of each answer
    position, one line per task. Returns the matplotlib figure."""
    if not dynamics:
        raise ValueError("no tasks to plot: pass denoising_dynamics(...)'s result")
    plt = pyplot()
    fig, (steps_ax, commit_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    longest = max(max(d.steps_histogram) for d in dynamics.values())
    width = 0.8 / len(dynamics)
    for index, d in enumerate(dynamics.values()):
        counts = d.steps_histogram
        xs = list(range(1, longest + 1))
        shares = [counts.get(x, 0) / len(d.runs) for x in xs]
        steps_ax.bar([x - 0.4 + (index + 0.5) * width for x in xs], shares, width=width, label=d.task)
        by_position = d.commit_step_by_position()
        commit_ax.plot(range(len(by_position)), by_position, marker="o", markersize=3, label=d.task)
    steps_ax.set_xlabel("denoising steps per run")
    steps_ax.set_ylabel("share of runs")
    steps_ax.legend(fontsize=8)
    commit_ax.set_xlabel("answer position")
    commit_ax.set_ylabel("mean commit step")
    commit_ax.legend(fontsize=8)
    return finish_panels(fig, title)
