"""diffusionlens: mechanistic interpretability for DiffusionGemma, with a step axis."""

from diffusionlens.cache import ActivationCache
from diffusionlens.config import DiffusionGemmaConfig
from diffusionlens.hook_points import HookContext, HookedRootModule, HookError, HookPoint
from diffusionlens.model import HookedDiffusionGemma
from diffusionlens.prompt_state import PromptState

__version__ = "0.1.0"

__all__ = [
    "ActivationCache",
    "DiffusionGemmaConfig",
    "HookContext",
    "HookError",
    "HookPoint",
    "HookedDiffusionGemma",
    "HookedRootModule",
    "PromptState",
]
