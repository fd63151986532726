"""The fast path of frozen-trajectory sweeps: start each cell at the patched block, many cells at once.

A frozen cell re-runs the corrupted run's decoder pass at a step with one patch applied. Everything
upstream of the patched hook is the same in every cell (the prompt's keys and values, the embedding,
the blocks before the patched one), so it is computed once per step: one unpatched pass records the
input of every block a cell starts at (`hook_resid_pre`, bit-identical to the full pass, see
`DecoderStack.run_blocks`). A cell then runs blocks >= l from that input (`denoise(...,
start_at_layer=l)`); the patch hook fires inside block l, on its input too, so a patch at
`hook_resid_pre` of block l is applied to the cached input. Cells that share a step and a hook run
together along the batch axis, chunked to `batch_size` cells or a `max_bytes` budget, reading one
prompt state expanded along the batch (a view, not a copy, for a one-row prompt).

Where a cell's patch does not fire at a step the metric reads, that step's logits are the corrupted
run's recorded ones: a frozen re-run of an unpatched step recomputes exactly them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from diffusionlens.components.prompt_state import PromptState
from diffusionlens.patching.runs import SELF_COND, PatchedRun, encode_through
from diffusionlens.patching.spec import Patch
from diffusionlens.sampling.loop import expand_state
from diffusionlens.sampling.recorded import enter_recorded_step

if TYPE_CHECKING:
    from diffusionlens.model import HookedDiffusionGemma

#: Cells per chunk when neither `batch_size` nor `max_bytes` is given.
DEFAULT_BATCH_SIZE = 16
#: Where a cell starts, for hooks before the first block: embed the canvas (and self-conditioning) again.
EMBED = -1
_BLOCK_HOOK = re.compile(r"^decoder\.blocks\.(\d+)\.")


def start_of(model: HookedDiffusionGemma, name: str) -> int | None:
    """The first decoder block a patch at hook `name` can change (`EMBED`: the embedding itself;
    n_layers: only the final norm and unembedding), or None where the fast path does not apply
    (encoder and sampler hooks, patterns that are not one hook)."""
    if name not in model.hook_dict:
        return None
    if match := _BLOCK_HOOK.match(name):
        return int(match.group(1))
    if name.startswith("decoder.ln_final.") or name == "decoder.hook_logits":
        return model.cfg.num_hidden_layers
    if name == "decoder.hook_embed" or name.startswith("decoder.self_cond."):
        return EMBED
    return None


@dataclass
class Cell:
    """One sweep cell: its patch, the steps its patch fires at among those re-run, the steps the metric reads."""

    index: int
    patch: Patch
    metric: Any
    fire_steps: list[int]
    read_steps: list[int]
    logits: dict[int, torch.Tensor] = field(default_factory=dict)


def bytes_per_cell(model: HookedDiffusionGemma, base: PatchedRun, start: int) -> int:
    """An upper estimate of the memory one cell adds to a chunk: its residual and the largest
    intermediate of a block (MLP, experts or attention scores), its logits (twice: the fp32 head and
    a slice), the canvas and self-conditioning inputs when it starts at the embedding, and its own
    copy of the prompt keys/values when the prompt has several rows (one row is broadcast for free)."""
    batch, prompt_len = base.input_ids.shape
    item = torch.empty((), dtype=model.dtype).element_size()
    per_position = block_bytes_per_position(model, prompt_len)
    if start == EMBED:
        per_position += model.cfg.vocab_size * item  # the self-conditioning logits, repeated per cell
    kv = prompt_kv_bytes(model, prompt_len) if batch > 1 else 0
    return batch * (model.cfg.canvas_length * per_position + kv)


def block_bytes_per_position(model: HookedDiffusionGemma, prompt_len: int) -> int:
    """Bytes per canvas position of one decoder pass's live values: the residual and the largest
    intermediate of a block (MLP, experts or attention scores), the logits twice (the fp32 head and a slice)."""
    cfg = model.cfg
    item = torch.empty((), dtype=model.dtype).element_size()
    widest = max(
        cfg.intermediate_size,
        cfg.top_k_experts * cfg.moe_intermediate_size,
        cfg.num_attention_heads * (prompt_len + cfg.canvas_length),
    )
    return (6 * cfg.hidden_size + 2 * widest + 2 * cfg.vocab_size) * item


def prompt_kv_bytes(model: HookedDiffusionGemma, positions: int) -> int:
    """Bytes of one row's prompt keys and values over `positions` encoded positions (every layer)."""
    cfg = model.cfg
    item = torch.empty((), dtype=model.dtype).element_size()
    per_position = sum(
        2 * cfg.layer_kv_heads(layer) * cfg.layer_head_dim(layer) for layer in range(cfg.num_hidden_layers)
    )
    return per_position * positions * item


def cells_per_chunk(per_cell: int, batch_size: int | None, max_bytes: int | None) -> int:
    """How many cells run together: `batch_size`, or as many as `max_bytes` holds, whichever is fewer."""
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1 cell, got {batch_size}")
    if max_bytes is None:
        return batch_size or DEFAULT_BATCH_SIZE
    if max_bytes < per_cell:
        raise ValueError(
            f"max_bytes={max_bytes} is too small for one cell, which needs about {per_cell} bytes; "
            f"raise max_bytes to at least {per_cell}"
        )
    fits = max_bytes // per_cell
    return min(fits, batch_size) if batch_size is not None else fits


def block_inputs(
    model: HookedDiffusionGemma,
    canvas: torch.Tensor,
    state: PromptState,
    self_cond: torch.Tensor | None,
    starts: Sequence[int],
) -> dict[int, Float[torch.Tensor, "batch canvas d_model"]]:
    """The unpatched input of every block in `starts` at one step, from a single pass that stops at
    the deepest one (each stretch of blocks is bit-identical to the same blocks of a full pass)."""
    inputs: dict[int, torch.Tensor] = {}
    resid = model.decoder.embed_canvas(canvas, self_cond)
    done = 0
    for start in sorted(s for s in set(starts) if s != EMBED):
        resid = model.decoder.run_blocks(resid, state, done, start)
        inputs[start], done = resid, start
    return inputs


def chunked(items: list, size: int) -> Iterator[list]:
    for first in range(0, len(items), size):
        yield items[first : first + size]


def frozen_fast_sweep(
    model: HookedDiffusionGemma,
    corrupted: PatchedRun,
    cells: list[Cell],
    *,
    batch_size: int | None,
    max_bytes: int | None,
    progress: bool,
) -> tuple[Float[torch.Tensor, " cell"], dict[str, Any]]:
    """Metric value per cell (in `cells` order) and what the run held (for the sweep's metadata)."""
    ctx = model.hook_ctx
    starts = {cell.index: start_of(model, cell.patch.hook) for cell in cells}
    per_cell = max(bytes_per_cell(model, corrupted, start) for start in set(starts.values()))
    chunk_size = cells_per_chunk(per_cell, batch_size, max_bytes)
    values = torch.empty(len(cells))
    held = {"bytes_per_cell": per_cell, "cells_per_chunk": chunk_size, "block_input_bytes": 0, "chunks": 0}
    max_steps = corrupted.settings.max_denoising_steps
    fire_steps = sorted({step for cell in cells for step in cell.fire_steps})
    by_step = {step: [c for c in cells if step in c.fire_steps] for step in fire_steps}
    bar = tqdm(total=len(cells), desc="patch sweep", disable=not progress, leave=False)
    try:
        with torch.inference_mode():
            state = encode_through(model, corrupted, 0)
            for cell in cells:
                if not cell.fire_steps:  # nothing to re-run: the corrupted run's own logits
                    values[cell.index] = _score(cell, corrupted)
                    bar.update(1)
            for step in fire_steps:
                canvas = enter_recorded_step(model, corrupted.trace, 0, step)
                self_cond = corrupted.cache.get(SELF_COND, canvas=0, step=step) if step > 0 else None
                inputs = block_inputs(model, canvas, state, self_cond, [starts[c.index] for c in by_step[step]])
                held["block_input_bytes"] = max(
                    held["block_input_bytes"], sum(t.numel() * t.element_size() for t in inputs.values())
                )
                groups: dict[str, list[Cell]] = {}
                for cell in by_step[step]:
                    groups.setdefault(cell.patch.hook, []).append(cell)
                for name, group in groups.items():
                    start = starts[group[0].index]
                    for chunk in chunked(group, chunk_size):
                        logits = _run_chunk(model, chunk, name, start, inputs, canvas, self_cond, state, max_steps)
                        held["chunks"] += 1
                        for cell, cell_logits in zip(chunk, logits, strict=True):
                            cell.logits[step] = cell_logits
                            if step == cell.fire_steps[-1]:
                                values[cell.index] = _score(cell, corrupted)
                                cell.logits.clear()
                                bar.update(1)
                del inputs
    finally:
        ctx.reset()
        bar.close()
    return values, held


def _run_chunk(
    model: HookedDiffusionGemma,
    chunk: list[Cell],
    name: str,
    start: int,
    inputs: dict[int, torch.Tensor],
    canvas: torch.Tensor,
    self_cond: torch.Tensor | None,
    state: PromptState,
    max_steps: int,
) -> list[Float[torch.Tensor, "batch canvas vocab"]]:
    """The logits of each cell of `chunk` (cells patching hook `name`) at the current step; `max_steps`
    is the run's step budget, from which negative patch steps count."""
    n = len(chunk)
    rows = canvas.shape[0]
    appliers = [cell.patch.hooks(model, max_steps)[0][1] for cell in chunk]

    def apply_each(value: torch.Tensor, hook: Any) -> torch.Tensor:
        # Each cell's own patch, on its own rows: the same elementwise write the reference path makes.
        parts = []
        for i, apply in enumerate(appliers):
            part = value[i * rows : (i + 1) * rows]
            patched = apply(part, hook)
            parts.append(part if patched is None else patched)
        return torch.cat(parts)

    expanded = expand_state(state, n)
    with model.hooks_for_run(fwd_hooks=[(name, apply_each)]):
        if start == EMBED:
            repeated_cond = None if self_cond is None else self_cond.repeat(n, 1, 1)
            logits = model.denoise(canvas.repeat(n, 1), expanded, repeated_cond)
        else:
            logits = model.denoise(inputs[start].repeat(n, 1, 1), expanded, start_at_layer=start)
    return list(logits.view(n, rows, *logits.shape[1:]).unbind(0))


def _score(cell: Cell, corrupted: PatchedRun) -> float:
    logits = {(0, s): corrupted.logits_at(s) for s in cell.read_steps}
    logits.update({(0, s): v for s, v in cell.logits.items()})
    run = PatchedRun(
        corrupted.input_ids,
        corrupted.attention_mask,
        "frozen",
        corrupted.trace,
        logits,
        None,
        None,
        corrupted.generate_kwargs,
    )
    return float(cell.metric(run))
