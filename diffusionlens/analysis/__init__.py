"""Analyses of denoising trajectories."""

from diffusionlens.analysis.transparency import auroc, top1_matches_final, top_k_mass, transparency_summary

__all__ = ["auroc", "top1_matches_final", "top_k_mass", "transparency_summary"]
