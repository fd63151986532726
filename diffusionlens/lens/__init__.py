"""Readers of latent activations across denoising steps: a tuned lens per step and canvas-scope.

`TunedLens` translates each decoder layer's residual at each step into the model's output space;
`canvas_scope` writes a latent into another run's canvas and lets the denoiser say what it holds.
Only torch is imported here; matplotlib figures come from `diffusionlens.lens.train_tuned` when it runs.
"""

from diffusionlens.lens.harvest import StepResiduals, harvest_residuals, resid_hook
from diffusionlens.lens.scope import ROUTES, canvas_scope, canvas_scope_tokens
from diffusionlens.lens.translators import KINDS, StepTranslators
from diffusionlens.lens.tuned import TunedLens

__all__ = [
    "KINDS",
    "ROUTES",
    "StepResiduals",
    "StepTranslators",
    "TunedLens",
    "canvas_scope",
    "canvas_scope_tokens",
    "harvest_residuals",
    "resid_hook",
]
