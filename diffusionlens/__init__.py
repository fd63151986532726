"""diffusionlens: mechanistic interpretability for DiffusionGemma, with a step axis."""

from diffusionlens.cache.activation import ActivationCache
from diffusionlens.cache.denoising import CacheBudgetError, CacheIntegrityError, DenoisingCache, RecordSpec
from diffusionlens.causal_lm import HookedGemma4CausalLM
from diffusionlens.components.prompt_state import PromptState
from diffusionlens.config import DiffusionGemmaConfig
from diffusionlens.hooks.generation_context import HookContext
from diffusionlens.hooks.points import HookedRootModule, HookError, HookPoint
from diffusionlens.hooks.shapes import estimate_cache_bytes, hook_specs
from diffusionlens.model import HookedDiffusionGemma
from diffusionlens.sampling import GenerationResult, GenerationSettings, ReplayNoise, RowReplayNoise, TorchRNGNoise
from diffusionlens.sampling.bottleneck import TokenBottleneck
from diffusionlens.sampling.trace import CanvasTrace, DenoisingTrace
from diffusionlens.weights.factored_matrix import FactoredMatrix
from diffusionlens.weights.tl_weights import BlockWeights, ModelWeights, block_weights, model_weights

__version__ = "0.1.0"

__all__ = [
    "ActivationCache",
    "CacheBudgetError",
    "CacheIntegrityError",
    "CanvasTrace",
    "DenoisingCache",
    "DenoisingTrace",
    "FactoredMatrix",
    "BlockWeights",
    "ModelWeights",
    "block_weights",
    "model_weights",
    "GenerationResult",
    "GenerationSettings",
    "RecordSpec",
    "ReplayNoise",
    "RowReplayNoise",
    "TokenBottleneck",
    "TorchRNGNoise",
    "estimate_cache_bytes",
    "hook_specs",
    "DiffusionGemmaConfig",
    "HookContext",
    "HookError",
    "HookPoint",
    "HookedDiffusionGemma",
    "HookedGemma4CausalLM",
    "HookedRootModule",
    "PromptState",
]
