"""Figures and the HTML trajectory viewer (matplotlib is imported here and nowhere else in the package).

Every figure function returns a `matplotlib.figure.Figure` (save it with `fig.savefig("x.png")` or `.svg`);
pyplot runs on the headless Agg backend unless you chose another backend first.
"""

from diffusionlens.viz.attention import AttentionKeys, attention_labels, attention_pattern
from diffusionlens.viz.attention_viewer import render_attention_viewer, write_attention_viewer
from diffusionlens.viz.circuitsvis_export import attention_circuitsvis, write_attention_circuitsvis
from diffusionlens.viz.dla import plot_dla_by_step
from diffusionlens.viz.feature_panel import FeaturePanel
from diffusionlens.viz.graph_view import render_graph_view, write_graph_view
from diffusionlens.viz.heatmaps import plot_sweep, plot_sweeps
from diffusionlens.viz.lens import plot_logit_lens, plot_logit_lens_by_step
from diffusionlens.viz.trajectory import plot_commit_order, plot_entropy, plot_token_grid
from diffusionlens.viz.viewer import render_viewer, write_viewer

__all__ = [
    "AttentionKeys",
    "FeaturePanel",
    "attention_circuitsvis",
    "attention_labels",
    "attention_pattern",
    "render_attention_viewer",
    "write_attention_viewer",
    "write_attention_circuitsvis",
    "plot_commit_order",
    "plot_dla_by_step",
    "plot_entropy",
    "plot_logit_lens",
    "plot_logit_lens_by_step",
    "plot_sweep",
    "plot_sweeps",
    "plot_token_grid",
    "render_graph_view",
    "render_viewer",
    "write_graph_view",
    "write_viewer",
]
