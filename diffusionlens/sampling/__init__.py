"""The sampler: temperature schedule, entropy-bound acceptance, stopping, noise sources, generation."""

from diffusionlens.sampling.generate import GenerationResult, generate
from diffusionlens.sampling.noise import NoiseSource, ReplayNoise, RowReplayNoise, TorchRNGNoise
from diffusionlens.sampling.sampler import SamplerSettings

__all__ = [
    "GenerationResult",
    "NoiseSource",
    "ReplayNoise",
    "RowReplayNoise",
    "SamplerSettings",
    "TorchRNGNoise",
    "generate",
]
