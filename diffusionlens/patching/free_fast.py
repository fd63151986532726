"""The fast path of free-running sweeps: fork each cell at its first patched step, many cells at once.

With `ReplayNoise` every draw depends only on (seed, canvas, step), so a free run patched first at step
s is the corrupted run up to s (`fork_state`). The cells of a chunk are lanes of one `DenoisingLoop`
(`diffusionlens/sampling/loop.py`, the loop `generate` runs as one lane): cell i owns rows i*B …
i*B+B-1 (B = the corrupted run's rows), each cell's patch is applied to its own rows only, and each
cell's rows draw the noise a run of B rows draws alone (`PerCellNoise`). A cell joins the batch at its
fork step with the corrupted run's state there (canvas, self-conditioning input, drafts, stopped rows);
cells that fork at the same step join together.

Stopping is per cell, as in its own run: a cell leaves the step loop at the step after which all of
its rows have stopped (where its own generation would break) and its trace, logits and draft are
frozen there; rows that stop earlier stay in the batch with their values held fixed, exactly as
`generate` holds them. Later canvases start together for every cell still running (a cell whose rows
have all ended, by eos or length, is done and scored), each with its own prompt state from then on.

The prompt state of the first canvas is the corrupted run's, expanded along the batch: a view (no
copy) for a one-row prompt, one copy per change of the batch for several rows.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from diffusionlens.patching.frozen_fast import block_bytes_per_position, cells_per_chunk, chunked, prompt_kv_bytes
from diffusionlens.patching.metrics import ExactMatch, KLToClean, LogitDiff, Normalized, TargetProb
from diffusionlens.patching.runs import SETTING_NAMES, PatchedRun, encode_through, fork_state
from diffusionlens.patching.spec import Patch
from diffusionlens.sampling.generate import chosen_self_cond_transform
from diffusionlens.sampling.loop import DenoisingLoop, Lane, LoopRun, trace_settings
from diffusionlens.sampling.noise import NoiseSource, ReplayNoise, RowReplayNoise
from diffusionlens.sampling.trace import DenoisingTrace
from diffusionlens.weights.fingerprint import model_fingerprint

if TYPE_CHECKING:
    from diffusionlens.components.prompt_state import PromptState
    from diffusionlens.model import HookedDiffusionGemma

#: Cells per chunk for free sweeps when neither `batch_size` nor `max_bytes` is given: one, so that by
#: default every free cell is bit-identical to its own run (see `free_fast_sweep`).
DEFAULT_FREE_BATCH_SIZE = 1
#: The generate keywords of a base run the batched path reproduces; a run made with others (e.g.
#: bwd_hooks) keeps one generation per cell.
BATCHABLE_KWARGS = SETTING_NAMES | {"settings", "noise", "progress", "self_cond_transform", "bottleneck"}


@dataclass
class FreeCell:
    """One free-running sweep cell: its patch, its metric, the step its patch first writes at."""

    index: int
    patch: Patch
    metric: Any
    fork_step: int


def batchable(base: PatchedRun) -> bool:
    """Whether free cells of `base` can run batched: replayed noise, and only generate keywords
    whose effect is row by row (see `BATCHABLE_KWARGS`)."""
    kwargs = base.generate_kwargs
    return isinstance(kwargs.get("noise"), ReplayNoise | RowReplayNoise) and set(kwargs) <= BATCHABLE_KWARGS


@dataclass(frozen=True)
class KeptLogits:
    """Which decoder logits a cell keeps for its metric: every step ("all"), none ("none", e.g.
    `ExactMatch`), or the one step `step` of `canvas` that a one-step metric reads ("one"; a negative
    step counts from the cell's own last step, so the last -step steps are kept)."""

    kind: str
    canvas: int = 0
    step: int = 0

    @classmethod
    def of(cls, metric: Any) -> KeptLogits:
        while isinstance(metric, Normalized):
            metric = metric.metric
        if type(metric) in (LogitDiff, TargetProb, KLToClean):
            return cls("one", metric.canvas, metric.step)
        if type(metric) is ExactMatch:
            return cls("none")
        return cls("all")

    def steps_held(self, max_steps: int, n_canvases: int) -> int:
        """At most how many steps of logits a cell holds at once."""
        if self.kind == "all":
            return max_steps * n_canvases
        if self.kind == "none":
            return 0
        return 1 if self.step >= 0 else min(-self.step, max_steps)

    def keep(
        self,
        logits: dict[tuple[int, int], Float[torch.Tensor, "batch canvas vocab"]],
        canvas: int,
        step: int,
        value: Float[torch.Tensor, "batch canvas vocab"],
    ) -> None:
        """Store `value` as (canvas, step) if the metric may read it, dropping what it no longer can."""
        if self.kind == "none":
            return
        if self.kind == "all":
            logits[(canvas, step)] = value.clone()
            return
        if canvas != self.canvas or (self.step >= 0 and step != self.step):
            return
        logits[(canvas, step)] = value.clone()
        if self.step < 0:
            logits.pop((canvas, step + self.step), None)


def free_bytes_per_cell(model: HookedDiffusionGemma, base: PatchedRun, kept: KeptLogits) -> int:
    """An upper estimate of the memory one free cell adds to a chunk: a decoder pass's live values,
    its self-conditioning input, the sampler's float32 temporaries (scaled logits, probabilities and
    their cumulative sum, the entropy's three), the logits it keeps for its metric, its trace, and its
    own prompt keys/values (over every canvas) once its state differs from the corrupted run's."""
    cfg = model.cfg
    batch, prompt_len = base.input_ids.shape
    item = torch.empty((), dtype=model.dtype).element_size()
    settings = base.settings
    n_canvases = math.ceil(settings.max_new_tokens / cfg.canvas_length)
    length = cfg.canvas_length
    per_position = block_bytes_per_position(model, prompt_len) + cfg.vocab_size * (item + 6 * 4)
    steps = settings.max_denoising_steps * n_canvases
    kept_bytes = kept.steps_held(settings.max_denoising_steps, n_canvases) * length * cfg.vocab_size * 4
    trace = steps * length * (5 * 8 + 4 + 1 + 8 * settings.record_top_k)
    kv = prompt_kv_bytes(model, prompt_len + n_canvases * length) if batch > 1 or n_canvases > 1 else 0
    return batch * (length * per_position + kept_bytes + trace + kv)


def free_fast_sweep(
    model: HookedDiffusionGemma,
    corrupted: PatchedRun,
    cells: list[FreeCell],
    *,
    batch_size: int | None,
    max_bytes: int | None,
    progress: bool,
) -> tuple[Float[torch.Tensor, " cell"], dict[str, Any]]:
    """Metric value per cell (in `cells` order) and what the run held. Cells are sorted by fork step
    and run `batch_size` at a time, or as many as `max_bytes` holds (a budget below one cell is
    refused before anything runs); with neither, one at a time (`DEFAULT_FREE_BATCH_SIZE`).

    A free run feeds each step's logits into the next step (self-conditioning) and samples from them,
    so where batching changes the float arithmetic (kernels whose per-row result depends on the batch,
    e.g. grouped expert matmuls) the rounding differences of the first patched step are carried into
    every later one and can grow; where it does not, batched cells are bit-identical to their own runs.
    """
    if batch_size is None and max_bytes is None:
        batch_size = DEFAULT_FREE_BATCH_SIZE
    per_cell = max(free_bytes_per_cell(model, corrupted, KeptLogits.of(cell.metric)) for cell in cells)
    chunk_size = cells_per_chunk(per_cell, batch_size, max_bytes)
    values = torch.empty(len(cells))
    held = {"bytes_per_cell": per_cell, "cells_per_chunk": chunk_size, "chunks": 0, "steps_run": 0}
    ordered = sorted(cells, key=lambda cell: (cell.fork_step, cell.index))
    bar = tqdm(total=len(cells), desc="patch sweep", disable=not progress, leave=False)
    ctx = model.hook_ctx
    try:
        with torch.inference_mode():
            state = encode_through(model, corrupted, 0)
        ctx.reset()
        for chunk in chunked(ordered, chunk_size):
            runs, steps_run = run_free_cells(
                model,
                corrupted,
                [c.patch for c in chunk],
                [c.fork_step for c in chunk],
                [KeptLogits.of(c.metric) for c in chunk],
                prompt_state=state,
            )
            held["chunks"] += 1
            held["steps_run"] += steps_run
            for cell, run in zip(chunk, runs, strict=True):
                values[cell.index] = float(cell.metric(run))
                bar.update(1)
    finally:
        ctx.reset()
        bar.close()
    return values, held


class PerCellNoise:
    """Noise for a batch of cells of `rows` rows each: every cell draws what `noise` draws for a
    batch of `rows` alone (`ReplayNoise`'s draws depend on the batch shape)."""

    def __init__(self, noise: NoiseSource, rows: int) -> None:
        self.noise, self.rows = noise, rows

    def initial_canvas(
        self, batch: int, length: int, vocab: int, device: torch.device | str, canvas: int
    ) -> Int[torch.Tensor, "batch canvas"]:
        return self.noise.initial_canvas(self.rows, length, vocab, device, canvas).repeat(batch // self.rows, 1)

    def sample(
        self, probs: Float[torch.Tensor, "batch canvas vocab"], canvas: int, step: int
    ) -> Int[torch.Tensor, "batch canvas"]:
        rows = self.rows
        return torch.cat([self.noise.sample(probs[i : i + rows], canvas, step) for i in range(0, len(probs), rows)])

    def renoise(
        self, batch: int, length: int, vocab: int, device: torch.device | str, canvas: int, step: int
    ) -> Int[torch.Tensor, "batch canvas"]:
        return self.noise.renoise(self.rows, length, vocab, device, canvas, step).repeat(batch // self.rows, 1)


def run_free_cells(
    model: HookedDiffusionGemma,
    base: PatchedRun,
    patches: list[Patch],
    fork_steps: list[int],
    kept: list[KeptLogits] | None = None,
    *,
    prompt_state: PromptState | None = None,
) -> tuple[list[PatchedRun], int]:
    """Each patch's free-running re-run of `base` forked at its fork step (what `run_patched(model,
    base, patch, mode="free", fork_at=step)` returns), all run as lanes of one denoising loop; and how
    many batched decoder passes that took. `kept`: the logits each run keeps (default: every step)."""
    if not batchable(base):
        raise ValueError("batched free cells need a base run from record_run with ReplayNoise and row-wise settings")
    kwargs, settings, ctx = base.generate_kwargs, base.settings, model.hook_ctx
    kept = kept if kept is not None else [KeptLogits("all")] * len(patches)
    if prompt_state is None:
        with torch.inference_mode():
            prompt_state = encode_through(model, base, 0)
        ctx.reset()
    logits: list[dict[tuple[int, int], torch.Tensor]] = [{} for _ in patches]
    lanes = [
        Lane(
            base.input_ids,
            join_step=step,
            hooks=dict(patch.hooks(model, settings.max_denoising_steps)),
            keep_logits=functools.partial(keep.keep, held),
        )
        for patch, step, keep, held in zip(patches, fork_steps, kept, logits, strict=True)
    ]
    noise = PerCellNoise(kwargs["noise"], base.input_ids.shape[0])
    transform = chosen_self_cond_transform(kwargs.get("bottleneck"), kwargs.get("self_cond_transform"))
    run = LoopRun(settings, noise, transform)
    loop = DenoisingLoop(model, run, lanes, fork=lambda step: fork_state(model, base, step, prompt_state))
    try:
        with torch.inference_mode(), model.hooks_for_run(fwd_hooks=loop.lane_hooks()):
            passes = loop.run_all(prompt_state)
    finally:
        ctx.reset()
    trace_record = trace_settings(settings, kwargs["noise"], model.cfg)
    fingerprint = model_fingerprint(model)
    runs = []
    for lane, held in zip(lanes, logits, strict=True):
        run_logits = {(0, s): base.logits[(0, s)] for s in range(lane.join_step)}
        run_logits.update(held)
        trace = DenoisingTrace(lane.canvases, base.input_ids.shape[1], trace_record, fingerprint)
        runs.append(
            PatchedRun(base.input_ids, base.attention_mask, "free", trace, run_logits, lane.sequences, None, kwargs)
        )
    return runs, passes
