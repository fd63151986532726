"""Attribution graphs across denoising steps: transcoders, the replacement model of one trajectory, graphs."""

from diffusionlens.graphs.transcoders import Transcoder, TranscoderSet, load_transcoders

__all__ = ["Transcoder", "TranscoderSet", "load_transcoders"]
