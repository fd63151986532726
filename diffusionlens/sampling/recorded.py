"""Going back into a recorded generation: its prompt state at a canvas, and one decoder pass again.

Patching's frozen re-runs, the fast sweeps and `replay_step` all start here, so a recorded step is
re-entered one way: the prompt encoded canvas by canvas as generation encoded it (encoder hooks fire
with `ctx.canvas` set), and the decoder run on the canvas the trace says it read, with the hook
context set to that step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from jaxtyping import Bool, Float, Int

from diffusionlens.sampling.trace import DenoisingTrace

if TYPE_CHECKING:
    from diffusionlens.components.prompt_state import PromptState
    from diffusionlens.model import HookedDiffusionGemma


def encode_prompt(
    model: HookedDiffusionGemma,
    input_ids: Int[torch.Tensor, "batch pos"],
    attention_mask: Bool[torch.Tensor, "batch pos"] | Int[torch.Tensor, "batch pos"] | None,
    sequences: Int[torch.Tensor, "batch length"] | None,
    canvas: int,
) -> PromptState:
    """The prompt state the decoder read in `canvas`: the prompt encoded at canvas 0, then each finished
    canvas of `sequences` (prompt followed by the generated canvases) as the next began."""
    ctx, length = model.hook_ctx, model.cfg.canvas_length
    if canvas > 0 and sequences is None:
        raise ValueError(
            f"the prompt state of canvas {canvas} needs the run's sequences (a free-running run, or "
            "generate(...).sequences) to encode the canvases before it"
        )
    ctx.canvas, ctx.step, ctx.t = 0, None, None
    state = model.encode(input_ids, attention_mask)
    for index in range(1, canvas + 1):
        ctx.canvas = index
        start = input_ids.shape[1] + (index - 1) * length
        tokens = sequences[:, start : start + length].to(input_ids.device)
        state = model.encode(tokens, torch.ones_like(tokens, dtype=torch.bool), state)
    return state


def enter_recorded_step(
    model: HookedDiffusionGemma, trace: DenoisingTrace, canvas: int, step: int
) -> Int[torch.Tensor, "batch canvas"]:
    """Set the hook context to `step` of `canvas` as generation had it, and return a fresh copy (on the
    model's device) of the canvas the decoder read there. A copy, because a trace made under
    `inference_mode` holds inference tensors, which autograd may not save."""
    record = trace[canvas]
    ctx = model.hook_ctx
    ctx.canvas, ctx.step, ctx.t = canvas, step, int(record.t[step])
    return record.input_canvas[step].to(model.device).clone()


def rerun_recorded_pass(
    model: HookedDiffusionGemma,
    trace: DenoisingTrace,
    state: PromptState,
    self_cond: Float[torch.Tensor, "batch canvas vocab"] | None,
    *,
    canvas: int,
    step: int,
) -> Float[torch.Tensor, "batch canvas vocab"]:
    """The decoder's raw logits of a recorded step, recomputed: its canvas (from `trace`) read with
    `state` (see `encode_prompt`) and the self-conditioning input `self_cond` (None at step 0), with
    the hook context set as in generation, so every hook installed fires as it did there."""
    return model.denoise(enter_recorded_step(model, trace, canvas, step), state, self_cond)
