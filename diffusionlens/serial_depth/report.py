"""The DiffusionGemma vs autoregressive Gemma 4 opaque-depth report."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from .architectures import CausalLMPass, DiffusionStepPass, EncoderPass, build_stack, load_config
from .boundary import interpretable
from .compose import GenerationDepths, compose_depths
from .depth import SerialDepthResult, graph_depth, serial_depth
from .trace import trace

__all__ = ["DepthReport", "report", "topk_readout"]


def topk_readout(logits: Float[Tensor, "... v"], k: int = 64, temperature: float = 1.0) -> Tensor:
    """Logits -> an interpretable top-k token distribution (the bottleneck / a top-k sampler's view)."""
    values, idx = torch.topk(logits / temperature, k=k, dim=-1)
    return interpretable(torch.softmax(values, dim=-1)), interpretable(idx)


@dataclass
class DepthReport:
    """Per-pass depths, the composed generation depths and the settings they were measured with."""

    encoder: int
    decoder: int
    decoder_from_sc: int
    step: int
    ar: int
    readout: int
    generation: GenerationDepths
    settings: dict[str, Any] = field(default_factory=dict)
    results: dict[str, SerialDepthResult] = field(default_factory=dict, repr=False)

    def __str__(self) -> str:
        g, s = self.generation, self.settings
        rows = [
            f"config: {s.get('config')}  prompt_len={s.get('prompt_len')} canvas={s.get('canvas_length')} "
            f"steps={s.get('steps')} canvases={s.get('canvases')} readout_k={s.get('readout_k')}",
            f"encoder pass (prompt tokens -> KV cache)        {self.encoder}",
            f"decoder pass (canvas tokens + sc input -> logits) {self.decoder}",
            f"decoder pass from self-conditioning logits      {self.decoder_from_sc}",
            f"diffusion step (encoder + decoder, from tokens) {self.step}",
            f"AR Gemma 4 pass (prompt+canvas tokens -> logits) {self.ar}",
            f"readout (logits -> top-k distribution)          {self.readout}",
            f"opaque depth, naive self-conditioning           {g.naive}  ({g.naive_ratio:.2f}x AR)",
            f"opaque depth, token bottleneck                  {g.bottleneck}  ({g.bottleneck_ratio:.2f}x AR)",
            f"opaque depth, AR baseline                       {g.ar}",
            f"trace time {s.get('seconds', 0):.1f}s",
        ]
        return "\n".join(rows)


def report(
    config: str | Path | dict[str, Any] | None = None,
    prompt_len: int = 1024,
    steps: int = 48,
    canvases: int = 1,
    readout_k: int = 64,
    link_depth: int = 1,
    dtype: torch.dtype = torch.float32,
) -> DepthReport:
    """Measures DiffusionGemma's and AR Gemma 4's opaque serial depth from a config.

    Args:
        config: a DiffusionGemma ``config.json`` path or dict (``text_config`` + ``canvas_length``), or a bare
            text config; defaults to the shipped 26B-A4B config.
        prompt_len: prompt tokens in the encoder's KV cache. The AR baseline is traced over
            ``prompt_len + canvas_length`` tokens, the same context the canvas attends to.
        steps: denoising steps per canvas.
        canvases: canvases generated (they do not compound; see :mod:`.compose`).
        readout_k: k of the top-k readout charged at the end of every opaque chain.
        link_depth: depth of the logits processor between steps (temperature division: 1).
        dtype: dtype of the meta trace (only matters with reference-compatible cast rules).
    """
    t0 = time.perf_counter()
    spec, canvas = load_config(config)
    stack = build_stack(spec).to(dtype)
    meta = torch.device("meta")
    prompt = torch.empty(1, prompt_len, dtype=torch.long, device=meta)
    canvas_ids = torch.empty(1, canvas, dtype=torch.long, device=meta)
    sc_logits = torch.empty(1, canvas, spec.vocab_size, dtype=dtype, device=meta)

    # One trace of encoder + decoder serves every diffusion number: sources pick which inputs chains start
    # from (all: the step; sc logits only: D_sc; canvas + sc: the decoder without the encoder's chain).
    step_graph = trace(DiffusionStepPass(stack), prompt, canvas_ids, sc_logits)
    step = graph_depth(step_graph)
    from_sc = graph_depth(step_graph, sources=[2])
    decoder = graph_depth(step_graph, sources=[1, 2])
    encoder = _encoder_depth(stack, prompt)
    ar = serial_depth(CausalLMPass(stack), torch.empty(1, prompt_len + canvas, dtype=torch.long, device=meta))
    readout = serial_depth(topk_readout, torch.empty(1, canvas, spec.vocab_size, device=meta), k=readout_k)

    gen = compose_depths(
        step_depth=step.depth,
        sc_depth=from_sc.depth,
        ar_depth=ar.depth,
        steps=steps,
        canvases=canvases,
        readout_depth=readout.depth,
        link_depth=link_depth,
    )
    settings = {
        "config": "shipped 26B-A4B" if config is None else (str(config) if not isinstance(config, dict) else "dict"),
        "prompt_len": prompt_len,
        "canvas_length": canvas,
        "steps": steps,
        "canvases": canvases,
        "readout_k": readout_k,
        "seconds": time.perf_counter() - t0,
    }
    results = {"step": step, "decoder_from_sc": from_sc, "decoder": decoder, "ar": ar, "readout": readout}
    return DepthReport(
        encoder=encoder,
        decoder=decoder.depth,
        decoder_from_sc=from_sc.depth,
        step=step.depth,
        ar=ar.depth,
        readout=readout.depth,
        generation=gen,
        settings=settings,
        results=results,
    )


def _encoder_depth(stack: torch.nn.Module, prompt: Tensor) -> int:
    """Depth of the encoder's KV outputs (the deepest cache entry, from prompt tokens)."""
    res = serial_depth(EncoderPass(stack), prompt)
    return max(d for d in res.output_depths if d is not None)
