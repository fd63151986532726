"""Figures (matplotlib is imported here and nowhere else in the package)."""

from diffusionlens.viz.heatmaps import plot_sweep

__all__ = ["plot_sweep"]
