"""Direct logit attribution across denoising steps: how much each component of the decoder's residual
writes a target token's logit (or a target-minus-other logit difference) at one canvas position, at
every step of a generation.

The final norm is linear once its scale is fixed, so with `decoder.ln_final.hook_scale` recorded the
pre-soft-cap logit is exactly the sum of each component pushed through (scale × gain) and the tied
unembedding. The soft-cap (tanh) comes after and is not linear: attributions explain the logit before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float

if TYPE_CHECKING:
    from diffusionlens.denoising_cache import DenoisingCache
    from diffusionlens.model import HookedDiffusionGemma

#: What `generate_with_cache(..., names_filter=DLA_NAMES)` must record for `dla_by_step`.
DLA_NAMES = [
    "decoder.blocks.0.hook_resid_pre",
    "decoder.blocks.*.hook_attn_out",
    "decoder.blocks.*.hook_ffn_out",
    "decoder.ln_final.hook_scale",
    "decoder.ln_final.hook_normalized",
]


@dataclass(frozen=True)
class DLAByStep:
    """attributions `[step, component]`: each component's share of the target logit (difference) before
    the soft-cap, at `position` of canvas `canvas`, row `row`; labels name the components (`embed`, the
    self-conditioned input, then `{layer}_attn_out`, `{layer}_ffn_out`); logit `[step]` is the logit
    (difference) read off the final norm's output, which the attributions sum to."""

    attributions: Float[torch.Tensor, "step component"]
    labels: list[str]
    steps: list[int]
    logit: Float[torch.Tensor, " step"]
    position: int
    target: int
    other: int | None
    canvas: int = 0
    row: int = 0

    def top(self, step: int, k: int = 5) -> list[tuple[str, float]]:
        """The `k` components with the largest attribution (by absolute value) at `step`."""
        values = self.attributions[self.steps.index(step)]
        order = values.abs().argsort(descending=True)[:k]
        return [(self.labels[i], float(values[i])) for i in order]


def _token_id(model: HookedDiffusionGemma, token: int | str) -> int:
    return model.to_single_token(token) if isinstance(token, str) else int(token)


def dla_by_step(
    cache: DenoisingCache,
    target: int | str,
    *,
    position: int,
    other: int | str | None = None,
    steps: Sequence[int] | None = None,
    canvas: int = 0,
    row: int = 0,
) -> DLAByStep:
    """Direct logit attribution of `target` (minus `other`, when given) at canvas `position`, at every
    recorded step (or `steps`), from `cache.step_cache(s).decompose_resid()`: the embedding path and each
    block's attention and FFN outputs, rescaled by the later blocks' `layer_scalar`s.

    The cache must hold `DLA_NAMES` at each step: generate with `names_filter=DLA_NAMES` (plus whatever
    else you record). Steps without them are refused, naming what is missing.
    """
    model = cache.model
    if model is None:
        raise ValueError("this cache holds no model; build it with model.generate_with_cache")
    recorded = cache.steps(canvas)
    steps = list(recorded) if steps is None else [int(s) for s in steps]
    if not steps:
        raise ValueError(f"no steps recorded for canvas {canvas}")
    unrecorded = [s for s in steps if s not in recorded]
    if unrecorded:
        raise ValueError(f"steps {unrecorded} of canvas {canvas} were not recorded (recorded: {recorded})")
    target_id = _token_id(model, target)
    other_id = None if other is None else _token_id(model, other)
    W_U = model.decoder.embed.W_E.detach().float()
    direction = W_U[target_id] - (W_U[other_id] if other_id is not None else 0.0)
    gain = model.decoder.ln_final.weight.detach().float()
    per_step, logits, labels = [], [], None
    for step in steps:
        step_cache = cache.step_cache(step, canvas)
        missing = [n for n in _needed(model) if n not in step_cache]
        if missing:
            raise KeyError(
                f"step {step} of canvas {canvas} lacks {missing[:3]}{' …' if len(missing) > 3 else ''}: "
                "generate_with_cache(..., names_filter=diffusionlens.analysis.DLA_NAMES) records what DLA needs"
            )
        components, labels = step_cache.decompose_resid(stack="decoder", return_labels=True)
        if not 0 <= position < components.shape[2]:
            raise IndexError(f"position {position} out of range for {components.shape[2]} recorded positions")
        scale = step_cache["decoder.ln_final.hook_scale"][row, position].float()
        # the final norm is (x * scale * gain), linear in x once the scale is fixed
        per_step.append((components[:, row, position].float() * scale * gain) @ direction.to(scale.device))
        normed = step_cache["decoder.ln_final.hook_normalized"][row, position].float()
        logits.append(normed @ direction.to(normed.device))
    return DLAByStep(
        attributions=torch.stack(per_step).cpu(),
        labels=list(labels),
        steps=steps,
        logit=torch.stack(logits).cpu(),
        position=position,
        target=target_id,
        other=other_id,
        canvas=canvas,
        row=row,
    )


def _needed(model: HookedDiffusionGemma) -> list[str]:
    layers = range(model.cfg.num_hidden_layers)
    return [
        "decoder.blocks.0.hook_resid_pre",
        *(f"decoder.blocks.{i}.hook_attn_out" for i in layers),
        *(f"decoder.blocks.{i}.hook_ffn_out" for i in layers),
        "decoder.ln_final.hook_scale",
        "decoder.ln_final.hook_normalized",
    ]
