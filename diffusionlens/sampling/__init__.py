"""The sampler: settings, temperature schedule, entropy-bound acceptance, stopping, noise sources, generation."""

import warnings

from diffusionlens.sampling.generate import GenerationResult, generate, generate_with_cache
from diffusionlens.sampling.noise import NoiseSource, ReplayNoise, RowReplayNoise, TorchRNGNoise
from diffusionlens.sampling.settings import FROM_CONFIG, GenerationSettings

__all__ = [
    "FROM_CONFIG",
    "GenerationResult",
    "GenerationSettings",
    "NoiseSource",
    "ReplayNoise",
    "RowReplayNoise",
    "TorchRNGNoise",
    "generate",
    "generate_with_cache",
]


def __getattr__(name: str) -> object:
    if name == "SamplerSettings":
        warnings.warn(
            "SamplerSettings is now GenerationSettings; the old name goes away in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return GenerationSettings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
