"""Residuals across denoising steps, harvested from the model's own runs: what a lens is trained and judged on.

Every prompt is generated once (row i of the harvest with `RowReplayNoise` seed `seeds[i]`, so a run is
reproducible alone), recording `decoder.blocks.{l}.hook_resid_post` of every layer at every step of the first
canvas. One row of `StepResiduals` is one (run, step, canvas position); steps a run took after it stopped
(they exist only because other rows of its batch were still running) are dropped. Each row carries what the
readers are scored against: the position's final token, the token the step's pass read there, whether the
position lies in the answer (up to and including the first eos of the final canvas) and the step at which the
position committed (`diffusionlens.toy.dynamics.canvas_commit_steps`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float, Int
from tqdm.auto import tqdm

from diffusionlens.analysis.commit_order import answer_mask
from diffusionlens.sampling.noise import RowReplayNoise
from diffusionlens.toy.dynamics import canvas_commit_steps

if TYPE_CHECKING:
    from diffusionlens.model import HookedDiffusionGemma


def resid_hook(layer: int) -> str:
    """The hook a lens reads at `layer`: the residual stream after decoder block `layer`."""
    return f"decoder.blocks.{layer}.hook_resid_post"


@dataclass
class StepResiduals:
    """Residuals of every decoder layer at (run, step, position) rows, with labels.

    resid: `[rows, layer, d_model]` (`hook_resid_post` of blocks 0 … L-1); step, position, run (index into
    `prompts`): `[rows]`; final_token: the position's token in the run's final canvas; input_token: the token
    the step's pass read there; in_answer: position at or before the final canvas's first eos; commit_step:
    the step from which the position was accepted holding its final token.
    """

    resid: Float[torch.Tensor, "rows layer d_model"]
    step: Int[torch.Tensor, " rows"]
    position: Int[torch.Tensor, " rows"]
    run: Int[torch.Tensor, " rows"]
    final_token: Int[torch.Tensor, " rows"]
    input_token: Int[torch.Tensor, " rows"]
    in_answer: Bool[torch.Tensor, " rows"]
    commit_step: Int[torch.Tensor, " rows"]
    prompts: list[str]

    def __len__(self) -> int:
        return self.resid.shape[0]

    @property
    def n_layers(self) -> int:
        return self.resid.shape[1]

    def steps(self) -> list[int]:
        return sorted(set(self.step.tolist()))

    def subset(self, rows: Bool[torch.Tensor, " rows"] | Int[torch.Tensor, " n"]) -> StepResiduals:
        """The rows `rows` selects (a mask or indices), prompts unchanged."""
        fields = ("resid", "step", "position", "run", "final_token", "input_token", "in_answer", "commit_step")
        return StepResiduals(**{name: getattr(self, name)[rows] for name in fields}, prompts=self.prompts)


def harvest_residuals(
    model: HookedDiffusionGemma,
    prompts: Sequence[str],
    *,
    seeds: Sequence[int] | None = None,
    batch_size: int = 32,
    progress: bool = True,
    **generate_kwargs: Any,
) -> StepResiduals:
    """Generate every prompt (first canvas only, row i with `RowReplayNoise(seeds[i])`; default seeds 0, 1, …)
    and collect the residuals of every decoder layer at every step it ran. `generate_kwargs` are generation
    settings (`max_denoising_steps=`, `entropy_bound=`, …), default `GenerationSettings()`'s."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("give at least one prompt to harvest residuals from")
    seeds = list(range(len(prompts))) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts; give one seed per prompt")
    if "noise" in generate_kwargs:
        raise ValueError("the noise is set per prompt here (RowReplayNoise(seeds)); drop noise=")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    parts: list[StepResiduals] = []
    bar = tqdm(total=len(prompts), desc="harvest", disable=not progress)
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = range(start, min(start + batch_size, len(prompts)))
            parts.append(harvest_batch(model, prompts, list(chunk), [seeds[i] for i in chunk], generate_kwargs))
            bar.update(len(chunk))
    finally:
        bar.close()
    return concatenate(parts, prompts)


def harvest_batch(
    model: HookedDiffusionGemma,
    prompts: list[str],
    runs: list[int],
    seeds: list[int],
    generate_kwargs: dict[str, Any],
) -> StepResiduals:
    """One batch of `harvest_residuals`: runs `runs` (indices into `prompts`) generated together."""
    n_layers = model.cfg.num_hidden_layers
    ids, attention = model.to_tokens_and_mask([prompts[i] for i in runs])
    kwargs = {"max_new_tokens": model.cfg.canvas_length, **generate_kwargs}
    result, cache = model.generate_with_cache(
        ids,
        attention_mask=attention,
        noise=RowReplayNoise(seeds),
        progress=False,
        names_filter=[resid_hook(layer) for layer in range(n_layers)],
        canvases=[0],
        **kwargs,
    )
    trace = result.trace[0]
    stop = trace.stop_step().cpu()
    commit = canvas_commit_steps(trace).cpu()
    eos = model.cfg.eos_token_id
    answer = answer_mask(trace, () if eos is None else eos, include_eos=True).cpu()
    final = trace.final.cpu()
    steps = cache.steps(0)
    resid = torch.stack([cache[resid_hook(layer)] for layer in range(n_layers)], dim=2).cpu()  # [step b layer p d]
    resid = resid[: len(steps)].permute(0, 1, 3, 2, 4)  # [step, batch, pos, layer, d]
    n_steps, batch, length = resid.shape[:3]
    step_grid = torch.arange(n_steps).view(-1, 1, 1).expand(n_steps, batch, length)
    keep = step_grid <= stop.view(1, -1, 1)
    position = torch.arange(length).view(1, 1, -1).expand_as(step_grid)
    run = torch.tensor(runs).view(1, -1, 1).expand_as(step_grid)
    expand = lambda t: t.unsqueeze(0).expand(n_steps, batch, length)  # noqa: E731
    return StepResiduals(
        resid=resid[keep].float(),
        step=step_grid[keep],
        position=position[keep],
        run=run[keep],
        final_token=expand(final)[keep],
        input_token=trace.input_canvas.cpu()[:n_steps][keep],
        in_answer=expand(answer)[keep],
        commit_step=expand(commit)[keep],
        prompts=prompts,
    )


def concatenate(parts: list[StepResiduals], prompts: list[str]) -> StepResiduals:
    names = ("resid", "step", "position", "run", "final_token", "input_token", "in_answer", "commit_step")
    return StepResiduals(**{n: torch.cat([getattr(p, n) for p in parts]) for n in names}, prompts=prompts)
