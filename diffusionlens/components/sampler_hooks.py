"""Hook points for the sampler's view of each denoising step (fired by `generate`, not by forward)."""

from __future__ import annotations

from torch import nn

from diffusionlens.hook_points import HookPoint

SAMPLER_HOOKS = {
    "logits": "temperature-scaled logits the sampler draws from [batch, canvas, vocab]",
    "sampled": "tokens drawn from those logits [batch, canvas]",
    "argmax": "argmax of those logits, the step's draft answer [batch, canvas]",
    "entropy": "per-position entropy of those logits [batch, canvas]",
    "accepted": "positions accepted this step (bool) [batch, canvas]",
    "canvas_next": "the canvas fed to the next step, after renoising [batch, canvas]",
}


class SamplerHooks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for name in SAMPLER_HOOKS:
            setattr(self, f"hook_{name}", HookPoint())
