"""Model components, one small module per file."""

from diffusionlens.components.attention import Attention
from diffusionlens.components.block import Block
from diffusionlens.components.embed import Embed
from diffusionlens.components.mlp import GatedMLP
from diffusionlens.components.moe import MoE
from diffusionlens.components.norms import RMSNorm
from diffusionlens.components.rope import RotaryEmbedding
from diffusionlens.components.self_conditioning import SelfConditioning

__all__ = ["Attention", "Block", "Embed", "GatedMLP", "MoE", "RMSNorm", "RotaryEmbedding", "SelfConditioning"]
