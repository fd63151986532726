"""The sampler: settings, temperature schedule, entropy-bound acceptance, stopping, noise sources, generation."""

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
