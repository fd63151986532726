"""The reference sampler's pieces as plain functions: temperature schedule, entropy, entropy-bound
acceptance and the stable-and-confident stopping rule. Each computes exactly what transformers'
`generation_diffusion_gemma.py` computes, op for op, so results agree bit for bit."""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int

from diffusionlens.sampling.settings import GenerationSettings


def temperature(t: int, settings: GenerationSettings, device: torch.device) -> torch.Tensor:
    """Linear schedule: t_max at the first step (t = N), t_min approached at the last (t = 1).

    Computed with the reference's int32 tensor arithmetic so the float32 result is identical.
    """
    cur = torch.tensor(t, device=device, dtype=torch.int32)
    return settings.t_min + ((settings.t_max - settings.t_min) * (cur / settings.max_denoising_steps))


def entropy(logits: Float[torch.Tensor, "... vocab"]) -> Float[torch.Tensor, "..."]:
    """Entropy of softmax(logits), as torch.distributions.Categorical computes it."""
    normalized = logits - logits.logsumexp(dim=-1, keepdim=True)
    probs = torch.softmax(normalized, dim=-1)
    clamped = torch.clamp(normalized, min=torch.finfo(normalized.dtype).min)
    return -(clamped * probs).sum(-1)


def entropy_bound_acceptance(
    token_entropy: Float[torch.Tensor, "batch canvas"], bound: float
) -> Bool[torch.Tensor, "batch canvas"]:
    """Accept the lowest-entropy positions while sum(entropies) - max(entropy) <= bound."""
    sorted_entropy, order = torch.sort(token_entropy, dim=-1, descending=False)
    cumulative = torch.cumsum(sorted_entropy, dim=-1)
    selected = cumulative - sorted_entropy <= bound
    return torch.scatter(input=torch.zeros_like(selected), dim=-1, index=order, src=selected)


class StableAndConfident:
    """Stop a row once its argmax canvas repeated for `stability_threshold` steps and the mean
    entropy of its temperature-scaled logits is below `confidence_threshold`."""

    def __init__(self, stability_threshold: int, confidence_threshold: float) -> None:
        self.stability_threshold = stability_threshold
        self.confidence_threshold = confidence_threshold
        self.history: torch.Tensor | None = None

    def __call__(
        self, argmax_canvas: Int[torch.Tensor, "batch canvas"], token_entropy: Float[torch.Tensor, "batch canvas"]
    ) -> Bool[torch.Tensor, " batch"]:
        """`token_entropy`: `entropy(logits)` of the temperature-scaled logits, per position."""
        if self.stability_threshold == 0:
            stable = torch.ones(token_entropy.shape[0], device=token_entropy.device, dtype=torch.bool)
        else:
            if self.history is None:
                self.history = torch.full(
                    (self.stability_threshold, *argmax_canvas.shape),
                    -1,
                    dtype=argmax_canvas.dtype,
                    device=argmax_canvas.device,
                )
            stable = (self.history == argmax_canvas[None]).all(dim=-1).all(dim=0)
            self.history = torch.roll(self.history, shifts=-1, dims=0)
            self.history[-1] = argmax_canvas
        confident = torch.mean(token_entropy, dim=-1) < self.confidence_threshold
        return stable & confident
