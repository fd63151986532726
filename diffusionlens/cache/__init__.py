"""Recorded activations: `activation` (ActivationCache, one forward pass), `denoising` (DenoisingCache and
RecordSpec, a generation with a step axis), `storage` (where a DenoisingCache keeps its tensors: memory, CPU
or a safetensors directory) and `decomposition` (residual-stream decompositions both caches share).

Import from the module itself (`from diffusionlens.cache.denoising import DenoisingCache`); the common
classes are also exported by `diffusionlens`.
"""
