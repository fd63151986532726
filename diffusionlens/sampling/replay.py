"""A differentiable replay of one recorded denoising step.

A loaded model is frozen (parameters have requires_grad=False) and `generate` runs under
`inference_mode`, so a generation leaves no graph to differentiate. `replay_step` builds one for one
recorded step: it re-runs the step's decoder pass with the decoder's embedding and self-conditioning
input as leaves. Parameter gradients stay off unless the caller turned them on. (One forward pass's
gradients: `run_with_cache(incl_bwd=True)`, in `diffusionlens.cache.gradients`.)
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int

from diffusionlens.cache.gradients import refuse_inference_mode
from diffusionlens.sampling.loop import finalize_canvas
from diffusionlens.sampling.recorded import encode_prompt, rerun_recorded_pass
from diffusionlens.sampling.step import held_for_stopped_rows, next_self_conditioning, scaled_logits
from diffusionlens.sampling.trace import DenoisingTrace
from diffusionlens.weights.fingerprint import fingerprint_mismatch, model_fingerprint

if TYPE_CHECKING:
    from diffusionlens.components.prompt_state import PromptState
    from diffusionlens.hooks.points import HookPoint
    from diffusionlens.model import HookedDiffusionGemma


def replay_step(
    model: HookedDiffusionGemma,
    source: Any,
    input_ids: Int[torch.Tensor, "batch pos"],
    *,
    step: int,
    canvas: int = 0,
    attention_mask: Int[torch.Tensor, "batch pos"] | None = None,
    self_cond_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Float[torch.Tensor, "batch canvas vocab"]:
    """Recompute the decoder logits of denoising step `step` of canvas `canvas`, with a graph.

    `source` is `generate(...)`'s result or its `.trace`; `input_ids` (and `attention_mask`) are the
    prompt given to `generate`. The step's input canvas comes from the trace; the prompt state is
    re-encoded from the prompt and the earlier canvases (from `result.sequences`, or rebuilt from the
    trace's argmax and eos settings); the self-conditioning logits are recomputed by replaying steps
    0..step-1 without grad, with the same arithmetic, so the result is bit-identical (float32) to the
    `decoder.hook_logits` value generation saw. Pass the `self_cond_transform`/bottleneck used in
    generation, and wrap the call in `model.hooks(...)` if generation had hooks that changed values.

    Gradients reach every decoder hook point downstream of `decoder.hook_embed` and the
    self-conditioning input (`decoder.self_cond.hook_logits_in`); the prompt's keys and values are
    held constant. Hooks see `hook.ctx.step/.canvas/.t` as in generation. Grad is enabled here even
    under `torch.no_grad()`.
    """
    from diffusionlens.sampling.generate import GenerationResult

    if isinstance(source, GenerationResult):
        trace, sequences = source.trace, source.sequences
    elif isinstance(source, DenoisingTrace):
        trace, sequences = source, None
    else:
        raise TypeError(
            f"source must be a GenerationResult or a DenoisingTrace (generate(...) or generate(...).trace), "
            f"got {type(source).__name__}"
        )
    if not isinstance(canvas, int) or not 0 <= canvas < len(trace):
        raise ValueError(f"canvas must be an int in [0, {len(trace)}): this generation has {len(trace)} canvases")
    record = trace[canvas]
    if not isinstance(step, int) or not 0 <= step < record.n_steps:
        raise ValueError(f"step must be an int in [0, {record.n_steps}): canvas {canvas} ran {record.n_steps} steps")
    refuse_inference_mode("replay_step")
    _check_same_model(trace, model)
    input_ids = model.check_tokens(input_ids, "input_ids")
    batch = record.input_canvas.shape[1]
    if input_ids.shape != (batch, trace.prompt_length):
        raise ValueError(
            f"input_ids has shape {tuple(input_ids.shape)} but this generation started from a prompt of shape "
            f"{(batch, trace.prompt_length)}; pass the prompt given to generate"
        )
    if sequences is not None and not torch.equal(sequences[:, : trace.prompt_length].to(input_ids.device), input_ids):
        raise ValueError("input_ids differ from the prompt of this generation; pass the prompt given to generate")
    if sequences is None:
        sequences = _rebuild_sequences(model, trace, input_ids, canvas)
    ctx = model.hook_ctx
    try:
        with torch.no_grad():
            state = encode_prompt(model, input_ids, attention_mask, sequences, canvas)
            self_cond = _self_conditioning(model, trace, canvas, state, step, self_cond_transform)
        with torch.enable_grad():
            if self_cond is not None:
                self_cond = self_cond.detach().requires_grad_(True)
            # A run hook, first at its point: another thread's passes never see it.
            with model.hooks_for_run():
                model.add_hook("decoder.hook_embed", _start_graph, prepend=True)
                # The embedding saves its token ids once parameters require grad: rerun_recorded_pass reads a
                # normal copy of the trace's canvas, not an inference tensor autograd may not save.
                return rerun_recorded_pass(model, trace, state, self_cond, canvas=canvas, step=step)
    finally:
        ctx.reset()


def _check_same_model(trace: DenoisingTrace, model: HookedDiffusionGemma) -> None:
    """Refuse a trace made by another model: its canvases would be replayed through other weights."""
    if trace.model_fingerprint is None:
        warnings.warn(
            "this trace records no model fingerprint (built by hand, or saved by an older diffusionlens), so "
            "replay_step cannot check that this model generated it; the logits are those of this model",
            UserWarning,
            stacklevel=3,
        )
        return
    mismatch = fingerprint_mismatch(trace.model_fingerprint, model)
    if mismatch is not None:
        raise ValueError(
            f"this trace was generated by another model: {mismatch}; its fingerprint is {trace.model_fingerprint}, "
            f"this model's {model_fingerprint(model)}. Replay it on the model that generated it (the same "
            "checkpoint and dtype); to run another model from the same prompt, generate with it"
        )


def _start_graph(embedding: torch.Tensor, hook: HookPoint) -> torch.Tensor:
    """Make the canvas embedding an autograd leaf so the decoder pass builds a graph on a frozen model."""
    return embedding.detach().requires_grad_(True)


def _self_conditioning(
    model: HookedDiffusionGemma,
    trace: DenoisingTrace,
    canvas: int,
    state: PromptState,
    step: int,
    transform: Callable[[torch.Tensor], torch.Tensor] | None,
) -> Float[torch.Tensor, "batch canvas vocab"] | None:
    """The self-conditioning input of `step`: steps 0..step-1 of generation through the step's own
    self-conditioning code (`sampling.step`), minus sampling (the trace already holds each step's input
    canvas and which rows had stopped)."""
    record, device = trace[canvas], model.device
    self_cond = None
    finished = torch.zeros(record.input_canvas.shape[1], dtype=torch.bool, device=device)
    for k in range(step):
        raw = rerun_recorded_pass(model, trace, state, self_cond, canvas=canvas, step=k)
        logits = held_for_stopped_rows(scaled_logits(model, raw, record.temperature[k].to(device)), self_cond, finished)
        self_cond = next_self_conditioning(logits, model.dtype, transform)
        finished = record.finished[k].to(device)
    return self_cond


def _rebuild_sequences(
    model: HookedDiffusionGemma, trace: DenoisingTrace, input_ids: torch.Tensor, canvas: int
) -> Int[torch.Tensor, "batch length"]:
    """The tokens generation encoded before `canvas`: each canvas's final argmax, padded after eos."""
    eos_ids = trace.settings.get("eos_token_id", list(model.cfg.eos_token_ids))
    pad_id = trace.settings.get("pad_token_id", model.cfg.pad_token_id)
    eos = torch.tensor(eos_ids, device=input_ids.device) if eos_ids else None
    sequences = input_ids
    finished_rows = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for index in range(canvas):
        sequences = torch.cat([sequences, trace[index].final.to(input_ids.device)], dim=-1)
        # A canvas after this one exists, so generation had not reached max_new_tokens here: no length cap.
        sequences, finished_rows = finalize_canvas(
            sequences, finished_rows, sys.maxsize, model.cfg.canvas_length, eos, pad_id
        )
    return sequences
