"""Steering across denoising steps: contrastive directions added on a step schedule.

A direction is the difference of mean activations between two recorded sets (two
`DenoisingCache`s, or tensors). `steering_hooks` adds `coefficient × schedule(step) × direction`
at chosen hooks, canvas positions and canvases while `generate` runs; hooks read
`hook.ctx.step` and `hook.ctx.canvas`, so the schedule can act on all steps, the first k, or a
ramp. `steering_sweep` measures any patching metric over a range of coefficients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from diffusionlens.cache.denoising import DenoisingCache
from diffusionlens.hooks.shapes import hook_specs

if TYPE_CHECKING:
    from diffusionlens.model import HookedDiffusionGemma
    from diffusionlens.patching.runs import PatchedRun

Schedule = str | tuple[str, int] | Callable[[int], float]


def mean_activation(
    source: DenoisingCache | torch.Tensor,
    hook_name: str | None = None,
    *,
    steps: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    canvas: int = 0,
) -> Float[torch.Tensor, " d"]:
    """Mean of `hook_name` over the recorded steps (or `steps`), rows and `positions` of a cache
    (positions index the recorded positions' canvas positions), or over every leading axis of a tensor."""
    if isinstance(source, torch.Tensor):
        return source.reshape(-1, source.shape[-1]).float().mean(0)
    if hook_name is None:
        raise ValueError("pass hook_name to average a DenoisingCache")
    chosen = source.steps(canvas) if steps is None else list(steps)
    values = torch.stack([source.get(hook_name, canvas=canvas, step=s) for s in chosen])  # [step, batch, pos, d]
    if positions is not None:
        recorded = source.positions or list(range(values.shape[2]))
        missing = [p for p in positions if p not in recorded]
        if missing:
            raise KeyError(f"positions {missing} were not recorded; recorded: {recorded}")
        values = values[:, :, [recorded.index(p) for p in positions]]
    return values.reshape(-1, values.shape[-1]).float().mean(0)


def mean_difference(
    positive: DenoisingCache | torch.Tensor,
    negative: DenoisingCache | torch.Tensor,
    hook_name: str | None = None,
    **select: Any,
) -> Float[torch.Tensor, " d"]:
    """The contrastive direction mean(positive) − mean(negative) (same selection on both sides)."""
    return mean_activation(positive, hook_name, **select) - mean_activation(negative, hook_name, **select)


def schedule_scale(schedule: Schedule, step: int) -> float:
    """The multiplier of the direction at `step`: "all" → 1; ("first", k) → 1 on steps < k, else 0;
    ("ramp", k) → 1 − step/k down to 0 at step k; a function of the step → its value."""
    if callable(schedule):
        return float(schedule(step))
    if schedule == "all":
        return 1.0
    if isinstance(schedule, tuple) and len(schedule) == 2 and schedule[0] in ("first", "ramp"):
        kind, k = schedule
        if k < 1:
            raise ValueError(f"schedule {schedule!r} needs k >= 1")
        return float(step < k) if kind == "first" else max(0.0, 1.0 - step / k)
    raise ValueError(f"schedule must be 'all', ('first', k), ('ramp', k) or a function of the step, got {schedule!r}")


def steering_hooks(
    direction: Float[torch.Tensor, " d"] | dict[str, Float[torch.Tensor, " d"]],
    hook_names: str | Sequence[str] | None = None,
    *,
    coefficient: float = 1.0,
    positions: int | Sequence[int] | None = None,
    canvases: int | Sequence[int] | None = None,
    schedule: Schedule = "all",
    model: HookedDiffusionGemma | None = None,
) -> list[tuple[str, Callable]]:
    """`fwd_hooks` adding `coefficient × schedule(step) × direction` at canvas `positions` (None:
    all) of `canvases` (None: all). `direction` is one vector for every hook in `hook_names`, or a
    dict hook name → vector. Encoder hooks (no step) are left alone: steering acts on denoising.
    With `model`, every hook name and vector width is checked now rather than mid-generation."""
    if isinstance(direction, dict):
        vectors = dict(direction)
    else:
        names = [hook_names] if isinstance(hook_names, str) else list(hook_names or ())
        if not names:
            raise ValueError("pass hook_names, or a dict hook name → direction")
        vectors = {name: direction for name in names}
    schedule_scale(schedule, 0)  # refuse a malformed schedule now, not mid-generation
    if model is not None:
        check_directions(model, vectors)
    pos = None if positions is None else torch.tensor([positions] if isinstance(positions, int) else list(positions))
    allowed = None if canvases is None else {canvases} if isinstance(canvases, int) else set(canvases)

    def make(vector: torch.Tensor) -> Callable:
        def steer(x: torch.Tensor, hook: Any) -> torch.Tensor:
            step, canvas = hook.ctx.step, hook.ctx.canvas
            if step is None or (allowed is not None and canvas not in allowed):
                return x
            scale = coefficient * schedule_scale(schedule, step)
            if scale == 0:
                return x
            if vector.shape[-1] != x.shape[-1]:
                raise ValueError(f"direction has {vector.shape[-1]} values but {hook.name} has {x.shape[-1]}")
            delta = (scale * vector).to(device=x.device, dtype=x.dtype)
            if pos is None:
                return x + delta
            mask = torch.zeros(x.shape[1], 1, dtype=x.dtype, device=x.device)
            mask[pos.to(x.device)] = 1
            return x + mask * delta

        return steer

    return [(name, make(vector)) for name, vector in vectors.items()]


def check_directions(model: HookedDiffusionGemma, vectors: dict[str, torch.Tensor]) -> None:
    """Refuse a steering direction that is not one vector of the width of its hook's last axis."""
    specs = hook_specs(model.cfg)
    for name, vector in vectors.items():
        if name not in model.hook_dict:
            raise KeyError(model.unknown_hook_message(name))
        width = specs[name].shape[-1]
        if not isinstance(vector, torch.Tensor) or vector.dim() != 1 or vector.shape[0] != width:
            shape = tuple(vector.shape) if isinstance(vector, torch.Tensor) else type(vector).__name__
            raise ValueError(
                f"the steering direction for {name} must be a vector of {width} values (its last axis), got {shape}"
            )


def steering_sweep(
    model: HookedDiffusionGemma,
    input_ids: Int[torch.Tensor, "batch pos"],
    direction: Float[torch.Tensor, " d"] | dict[str, Float[torch.Tensor, " d"]],
    hook_names: str | Sequence[str] | None,
    coefficients: Sequence[float],
    metric: Callable[[PatchedRun], float],
    *,
    positions: int | Sequence[int] | None = None,
    canvases: int | Sequence[int] | None = None,
    schedule: Schedule = "all",
    progress: bool = True,
    **generate_kwargs: Any,
) -> Float[torch.Tensor, " coefficient"]:
    """`metric` (any `diffusionlens.patching.metrics` metric, or a function of a `PatchedRun`) of a
    free-running generation at each coefficient, with `ReplayNoise(0)` unless `noise` is given, so
    every coefficient sees the same random draws."""
    from diffusionlens.patching.runs import record_run

    values = []
    for coefficient in tqdm(coefficients, desc="steering sweep", disable=not progress):
        hooks = steering_hooks(
            direction,
            hook_names,
            coefficient=coefficient,
            positions=positions,
            canvases=canvases,
            schedule=schedule,
            model=model,
        )
        run = record_run(model, input_ids, fwd_hooks=hooks, **generate_kwargs)
        values.append(float(metric(run)))
    return torch.tensor(values)
