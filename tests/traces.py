"""Hand-built denoising traces for the analysis tests (shared by unit and integration tests)."""

from __future__ import annotations

import torch

from diffusionlens.sampling.trace import CanvasTrace


def make_trace(argmax: torch.Tensor, **fields) -> CanvasTrace:
    """A CanvasTrace around a `[step, batch, canvas]` argmax; other fields default to neutral values."""
    steps, batch, _ = argmax.shape
    defaults = dict(
        input_canvas=torch.zeros_like(argmax),
        sampled=argmax.clone(),
        argmax=argmax,
        entropy=torch.zeros(argmax.shape),
        accepted=torch.zeros(argmax.shape, dtype=torch.bool),
        next_canvas=argmax.clone(),
        finished=torch.zeros(steps, batch, dtype=torch.bool),
        temperature=torch.ones(steps),
        t=torch.arange(steps, 0, -1),
    )
    defaults.update(fields)
    return CanvasTrace(**defaults)
