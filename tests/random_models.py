"""A random model for the decomposition tests (unit and integration): every tensor randomised, norm gains and
layer scalars around 1 with real spread, so a skipped norm, a missing scalar or a head/expert mix-up shows."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from diffusionlens import DiffusionGemmaConfig, HookedDiffusionGemma
from diffusionlens.components import norms as norms_module
from diffusionlens.graphs.attribution import attribute_trajectory
from diffusionlens.graphs.replacement import ReplacementModel, recorded_sources
from diffusionlens.graphs.trajectory import record_trajectory
from diffusionlens.graphs.transcoders import random_transcoders
from diffusionlens.sampling import ReplayNoise

# Sliding and full layers, grouped KV heads, attention biases (an o_proj bias component), top-2 of 3 experts.
CFG = DiffusionGemmaConfig(
    vocab_size=53,
    hidden_size=24,
    intermediate_size=20,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=6,
    global_head_dim=10,
    num_global_key_value_heads=1,
    sliding_window=4,
    layer_types=("sliding_attention", "full_attention", "sliding_attention"),
    num_experts=3,
    top_k_experts=2,
    moe_intermediate_size=7,
    attention_bias=True,
    canvas_length=5,
    max_position_embeddings=64,
)


def random_model(dtype: torch.dtype) -> HookedDiffusionGemma:
    model = HookedDiffusionGemma.from_config(CFG, dtype=dtype)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith(("embed_scale", "inv_freq")):
                continue
            noise = torch.randn(tensor.shape, generator=g, dtype=torch.float64)
            scale_like = "norm" in name or ".ln" in name or "scale" in name or "layer_scalar" in name
            tensor.copy_(1.0 + 0.3 * noise if scale_like else 0.3 * noise)
    return model


# The attribution-graph tests' trajectory: several steps of one canvas, every position a row candidate.
GRAPH_PROMPT = torch.tensor([[2, 5, 7, 9, 11, 3, 4]])
GRAPH_OPTIONS = dict(max_new_tokens=CFG.canvas_length, max_denoising_steps=4, entropy_bound=0.0)
GRAPH_TARGET = dict(position=2, step=3, token=(4, 7))


@contextmanager
def float64_graph_setup() -> Iterator[SimpleNamespace]:
    """The random model in float64 with float64 norms (so the replacement model is exact to 1e-8), random
    width-16 transcoders, the recorded trajectory of `GRAPH_PROMPT`, its replacement model and sources, and the
    unpruned graph of `GRAPH_TARGET` (every active feature a row). Norms stay in float64 while the block runs."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(norms_module, "COMPUTE_DTYPE", torch.float64)
        model = random_model(torch.float64)
        transcoders = random_transcoders(model, 16, seed=1, dtype=torch.float64)
        trajectory = record_trajectory(model, GRAPH_PROMPT, noise=ReplayNoise(0), **GRAPH_OPTIONS)
        yield SimpleNamespace(
            model=model,
            transcoders=transcoders,
            trajectory=trajectory,
            rm=ReplacementModel(model, transcoders, trajectory),
            sources=recorded_sources(trajectory, transcoders),
            graph=attribute_trajectory(model, transcoders, trajectory, GRAPH_TARGET, max_feature_nodes=None),
        )
