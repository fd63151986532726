"""Hook points for the sampler's view of each denoising step (fired by `generate`, not by forward)."""

from __future__ import annotations

from torch import nn

from diffusionlens.hooks.points import HookPoint

SAMPLER_HOOKS = {
    "logits": "temperature-scaled logits the sampler draws from [batch, canvas, vocab]",
    "sampled": "tokens drawn from those logits [batch, canvas]",
    "argmax": "argmax of those logits, the step's draft answer [batch, canvas]",
    "entropy": "per-position entropy of those logits [batch, canvas]",
    "accepted": "positions accepted this step (bool) [batch, canvas]",
    "canvas_next": "the canvas fed to the next step, after renoising [batch, canvas]",
}


class SamplerHooks(nn.Module):
    """One hook per entry of SAMPLER_HOOKS (same order), declared so that tools can see them."""

    def __init__(self) -> None:
        super().__init__()
        self.hook_logits = HookPoint()  # [batch, canvas, vocab] float32
        self.hook_sampled = HookPoint()  # [batch, canvas] int64
        self.hook_argmax = HookPoint()  # [batch, canvas] int64
        self.hook_entropy = HookPoint()  # [batch, canvas] float32
        self.hook_accepted = HookPoint()  # [batch, canvas] bool
        self.hook_canvas_next = HookPoint()  # [batch, canvas] int64
