"""One denoising step, as the reference runs it: the algorithm every generation loop calls.

logits -> temperature -> sample -> entropy-bound acceptance -> renoise -> stop. Every operation is
row by row except the noise draws, which the `NoiseSource` makes for the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float, Int

from diffusionlens.sampling.noise import NoiseSource
from diffusionlens.sampling.sampler import StableAndConfident, entropy, entropy_bound_acceptance, temperature
from diffusionlens.sampling.settings import GenerationSettings

if TYPE_CHECKING:
    from diffusionlens.model import HookedDiffusionGemma

SelfCondTransform = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class StepOutput:
    """What one denoising step computed. logits: the temperature-scaled logits after
    `sampler.hook_logits` (the previous step's for rows that had stopped: the next step's
    self-conditioning input); entropy: after `sampler.hook_entropy`; next_canvas: after
    `sampler.hook_canvas_next`; finished: rows stopped after this step."""

    raw: Float[torch.Tensor, "batch canvas vocab"]
    logits: Float[torch.Tensor, "batch canvas vocab"]
    probs: Float[torch.Tensor, "batch canvas vocab"]
    sampled: Int[torch.Tensor, "batch canvas"]
    argmax: Int[torch.Tensor, "batch canvas"]
    entropy: Float[torch.Tensor, "batch canvas"]
    accepted: Bool[torch.Tensor, "batch canvas"]
    next_canvas: Int[torch.Tensor, "batch canvas"]
    finished: Bool[torch.Tensor, " batch"]
    temperature: Float[torch.Tensor, ""]


def denoising_step(
    model: HookedDiffusionGemma,
    settings: GenerationSettings,
    noise: NoiseSource,
    canvas_index: int,
    step: int,
    t: int,
    canvas: Int[torch.Tensor, "batch canvas"],
    state: Any,
    self_cond: Float[torch.Tensor, "batch canvas vocab"] | None,
    argmax_canvas: Int[torch.Tensor, "batch canvas"],
    finished: Bool[torch.Tensor, " batch"],
    stopper: StableAndConfident,
) -> StepOutput:
    """One step of the sampler, as the reference runs it: decoder pass, temperature, sample, accept the
    lowest-entropy tokens within the bound, renoise the rest, stop rows that are stable and confident.
    Every operation is row by row except the noise draws, which `noise` makes for the whole batch.
    Rows already `finished` keep their canvas, draft and self-conditioning logits."""
    hooks, ctx = model.sampler, model.hook_ctx
    ctx.step, ctx.t = step, t
    batch, length = canvas.shape
    device, vocab = canvas.device, model.cfg.vocab_size
    raw = model.denoise(canvas, state, self_cond)
    temp = temperature(t, settings, device)
    logits = scaled_logits(model, raw, temp)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    sampled = hooks.hook_sampled(noise.sample(probs, canvas_index, step))
    new_argmax = hooks.hook_argmax(torch.argmax(logits, dim=-1))
    raw_entropy = entropy(logits)
    token_entropy = hooks.hook_entropy(raw_entropy)
    accepted = hooks.hook_accepted(entropy_bound_acceptance(token_entropy, settings.entropy_bound))
    kept = torch.where(accepted, sampled, canvas)
    fresh = noise.renoise(batch, length, vocab, device, canvas_index, step)
    next_canvas = torch.where(~accepted, fresh, kept)
    if finished.any():
        new_argmax = torch.where(finished[:, None], argmax_canvas, new_argmax)
        next_canvas = torch.where(finished[:, None], canvas, next_canvas)
    logits = held_for_stopped_rows(logits, self_cond, finished)
    next_canvas = hooks.hook_canvas_next(next_canvas)
    # The reference recomputes this entropy inside its stopping rule; rows whose logits were
    # swapped above are finished already, so reusing it changes no decision.
    finished = finished | stopper(new_argmax, raw_entropy)
    return StepOutput(raw, logits, probs, sampled, new_argmax, token_entropy, accepted, next_canvas, finished, temp)


def scaled_logits(
    model: HookedDiffusionGemma, raw: Float[torch.Tensor, "batch canvas vocab"], temp: Float[torch.Tensor, ""]
) -> Float[torch.Tensor, "batch canvas vocab"]:
    """The step's logits: the decoder's raw logits over the step's temperature, after `sampler.hook_logits`."""
    return model.sampler.hook_logits(raw / temp)


def held_for_stopped_rows(
    logits: Float[torch.Tensor, "batch canvas vocab"],
    self_cond: Float[torch.Tensor, "batch canvas vocab"] | None,
    finished: Bool[torch.Tensor, " batch"],
) -> Float[torch.Tensor, "batch canvas vocab"]:
    """The step's logits as the next step's self-conditioning reads them: rows `finished` before this
    step keep feeding their last self-conditioning logits, as the reference holds them."""
    return torch.where(finished[:, None, None], self_cond, logits) if finished.any() else logits


def next_self_conditioning(
    logits: Float[torch.Tensor, "batch canvas vocab"], dtype: torch.dtype, transform: SelfCondTransform | None
) -> Float[torch.Tensor, "batch canvas vocab"]:
    """The next step's self-conditioning input: the held logits in the model's dtype, then `transform`
    (a bottleneck or any self-conditioning transform) if given."""
    self_cond = logits.to(dtype)
    return self_cond if transform is None else transform(self_cond)
