"""Patch specifications and the hook functions that apply them.

A patch is (hook name or pattern, steps, positions, source). The source is another run's
DenoisingCache (clean → corrupted), another step of the same run (`CrossStep`), a fixed tensor
(e.g. a mean for ablation) or a function `fn(value, hook) -> value`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from diffusionlens.cache.denoising import DenoisingCache
from diffusionlens.cache.selectors import Selector, select_indices
from diffusionlens.hooks.shapes import position_axis

if TYPE_CHECKING:
    from diffusionlens.hooks.points import HookPoint
    from diffusionlens.model import HookedDiffusionGemma


@dataclass(frozen=True)
class CrossStep:
    """Source: the same run's value of the same hook at an earlier step (`step`, in the same canvas)."""

    step: int


_PER_HEAD_HOOKS = {
    "hook_q",
    "hook_k",
    "hook_v",
    "hook_rot_q",
    "hook_rot_k",
    "hook_z",
    "hook_attn_scores",
    "hook_pattern",
}
Source = DenoisingCache | CrossStep | torch.Tensor | Callable[[torch.Tensor, Any], torch.Tensor]


@dataclass
class Patch:
    """Write `source`'s value of `hook` into the run at `steps` and `positions` (and `canvases`).

    `steps`, `positions`, `canvases` and `heads` take an int, slice, list, bool mask or "all".
    Positions index the canvas for decoder and sampler hooks and the prompt for encoder hooks (the
    query axis of attention patterns); `heads` the head axis of per-head hooks. Encoder hooks fire
    once per canvas (no step), so `steps` does not apply to them.
    """

    hook: str
    source: Source
    steps: Selector = "all"
    positions: Selector = "all"
    canvases: Selector = "all"
    heads: Selector = "all"
    _stash: dict = field(default_factory=dict, repr=False, compare=False)

    def hooks(self, model: HookedDiffusionGemma, max_steps: int | None = None) -> list[tuple[str, Callable]]:
        """The hook pairs applying this patch in a run of `max_steps` denoising steps (the run's settings'
        `max_denoising_steps`, from which negative `steps` count). Without `max_steps` (hooks for a call of
        `generate` you make yourself) negative steps are refused, since the step budget is not known here."""
        names = model.resolve_hook_names(self.hook)
        steps = select_indices(self.steps, max_steps, "steps", "denoising steps (max_denoising_steps)")
        canvases = select_indices(self.canvases, None, "canvases")
        if any(not name.startswith("encoder.") for name in names):  # canvas positions: refuse before the run
            select_indices(self.positions, model.cfg.canvas_length, "positions", "canvas positions (canvas_length)")
        if isinstance(self.source, CrossStep) and steps is not None and any(s <= self.source.step for s in steps):
            raise ValueError(
                f"cross-step patch from step {self.source.step} into steps {sorted(steps)}: the source step must come "
                "first (record a cache and use it as the source to copy from a later step)"
            )
        self._stash.clear()
        return [(name, self._make_hook(name, steps, canvases)) for name in names]

    def _make_hook(self, name: str, steps: set[int] | None, canvases: set[int] | None) -> Callable:
        axes = {position_axis(name): (self.positions, "positions")}
        if self.heads != "all":
            if name.rsplit(".", 1)[-1] not in _PER_HEAD_HOOKS:
                raise ValueError(f"heads= applies to per-head hooks ({', '.join(sorted(_PER_HEAD_HOOKS))}), not {name}")
            axes[1 if name.endswith(("hook_attn_scores", "hook_pattern")) else 2] = (self.heads, "heads")

        def apply(value: torch.Tensor, hook: HookPoint) -> torch.Tensor | None:
            ctx = hook.ctx
            if canvases is not None and ctx.canvas not in canvases:
                return None
            if isinstance(self.source, CrossStep):
                if ctx.step == self.source.step:
                    self._stash[(hook.name, ctx.canvas)] = value.detach().clone()
                    return None
                if ctx.step is None or (steps is not None and ctx.step not in steps) or ctx.step < self.source.step:
                    return None
                donor = self._stash[(hook.name, ctx.canvas)]
            else:
                if ctx.step is not None and steps is not None and ctx.step not in steps:
                    return None
                donor = self._donor(value, hook)
                if donor is None:
                    return None
            return _write(value, donor.to(device=value.device, dtype=value.dtype), axes)

        return apply

    def _donor(self, value: torch.Tensor, hook: HookPoint) -> torch.Tensor | None:
        source = self.source
        if isinstance(source, DenoisingCache):
            ctx = hook.ctx
            if ctx.canvas not in source.canvases():
                if not source.ended_before(ctx.canvas):
                    raise KeyError(
                        f"{hook.name}: the patch source recorded canvases {source.canvases()}, not canvas "
                        f"{ctx.canvas}; record it (canvases=None) or limit the patch with canvases="
                        f"{source.canvases()}"
                    )
                return None  # the source run had finished before this canvas: nothing to carry over
            recorded = source.steps(ctx.canvas)
            if ctx.step is not None and recorded and ctx.step > recorded[-1]:
                return None  # the source run had stopped by this step: nothing to carry over
            donor = (
                source.get(hook.name, canvas=ctx.canvas, step=ctx.step)
                if ctx.step is not None
                else source.get(hook.name, canvas=ctx.canvas)
            )
            if source.positions is not None:
                raise ValueError(
                    "the source cache was recorded with a positions filter; record the patched hooks at every position"
                )
            return donor
        if isinstance(source, torch.Tensor):
            return source.expand_as(value)
        out = source(value, hook)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"patch source function for {hook.name} must return a tensor, got {type(out).__name__}")
        return out


def _write(value: torch.Tensor, donor: torch.Tensor, axes: dict[int, tuple[Selector, str]]) -> torch.Tensor:
    """`value` with `donor` written where every axis in `axes` is selected."""
    if donor.shape != value.shape:
        raise ValueError(
            f"patch source has shape {tuple(donor.shape)} but the value has {tuple(value.shape)}; the two runs must "
            "have the same batch, prompt length and canvas"
        )
    mask = torch.ones((), dtype=torch.bool, device=value.device)
    for axis, (selector, what) in axes.items():
        chosen = select_indices(selector, value.shape[axis], what, f"{what} of this hook")
        if chosen is None:
            continue
        along = torch.zeros(value.shape[axis], dtype=torch.bool, device=value.device)
        along[sorted(chosen)] = True
        mask = mask & along.view([-1 if i == axis else 1 for i in range(value.ndim)])
    return torch.where(mask, donor, value) if mask.ndim else donor


def patch_hooks(
    model: HookedDiffusionGemma,
    patches: Patch | Sequence[Patch],
    max_steps: int | None = None,
) -> list[tuple[str, Callable]]:
    """Hook pairs applying every patch (for `generate(fwd_hooks=...)` or `model.hooks(...)`)."""
    patches = [patches] if isinstance(patches, Patch) else list(patches)
    return [pair for patch in patches for pair in patch.hooks(model, max_steps)]
