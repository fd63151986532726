"""The fast path of free-running sweeps: fork each cell at its first patched step, many cells at once.

With `ReplayNoise` every draw depends only on (seed, canvas, step), so a free run patched first at step
s is the corrupted run up to s (`fork_state`). The cells of a chunk run as one generation along the
batch axis: cell i owns rows i*B … i*B+B-1 (B = the corrupted run's rows), each cell's patch is applied
to its own rows only, and each cell's rows draw the noise a run of B rows draws alone. A cell joins the
batch at its fork step with the corrupted run's state there (canvas, self-conditioning input, drafts,
stopped rows); cells that fork at the same step join together.

Stopping is per cell, as in its own run: a cell leaves the step loop at the step after which all of
its rows have stopped (where its own generation would break) and its trace, logits and draft are
frozen there; rows that stop earlier stay in the batch with their values held fixed, exactly as
`generate` holds them. Later canvases start together for every cell still running (a cell whose rows
have all ended, by eos or length, is done and scored), each with its own prompt state from then on.

The prompt state of the first canvas is the corrupted run's, expanded along the batch: a view (no
copy) for a one-row prompt, one copy per change of the batch for several rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from diffusionlens.patching.frozen_fast import (
    block_bytes_per_position,
    cells_per_chunk,
    chunked,
    expand_state,
    prompt_kv_bytes,
)
from diffusionlens.patching.metrics import ExactMatch, KLToClean, LogitDiff, Normalized, TargetProb
from diffusionlens.patching.runs import PatchedRun, encode_through, fork_state
from diffusionlens.patching.spec import Patch
from diffusionlens.sampling.generate import _canvas_trace, _finalize_canvas, _settings_dict, denoising_step
from diffusionlens.sampling.noise import NoiseSource, ReplayNoise, RowReplayNoise
from diffusionlens.sampling.sampler import StableAndConfident
from diffusionlens.sampling.settings import GenerationSettings
from diffusionlens.trace import DenoisingTrace
from diffusionlens.weights.fingerprint import model_fingerprint

if TYPE_CHECKING:
    from diffusionlens.model import HookedDiffusionGemma
    from diffusionlens.prompt_state import PromptState

#: Cells per chunk for free sweeps when neither `batch_size` nor `max_bytes` is given: one, so that by
#: default every free cell is bit-identical to its own run (see `free_fast_sweep`).
DEFAULT_FREE_BATCH_SIZE = 1
_SETTINGS = {f.name for f in fields(GenerationSettings)}
#: The generate keywords of a base run the batched path reproduces; a run made with others (e.g.
#: bwd_hooks) keeps one generation per cell.
BATCHABLE_KWARGS = _SETTINGS | {"settings", "noise", "progress", "self_cond_transform", "bottleneck"}


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


@dataclass(eq=False)
class _Lane:
    """One cell in the batched generation."""

    fork_step: int
    kept: KeptLogits
    appliers: dict[str, Callable]
    sequences: torch.Tensor
    finished_rows: torch.Tensor
    records: list[dict[str, list[torch.Tensor]]] = field(default_factory=list)
    logits: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    final_argmax: torch.Tensor | None = None  # the draft of the current canvas once the lane stopped


class _Rows:
    """The lanes in the step loop, in row order, and their per-row values."""

    def __init__(self, rows_per_lane: int) -> None:
        self.b = rows_per_lane
        self.lanes: list[_Lane] = []
        self.canvas: torch.Tensor | None = None
        self.self_cond: torch.Tensor | None = None
        self.argmax: torch.Tensor | None = None
        self.finished: torch.Tensor | None = None
        self.history: torch.Tensor | None = None

    def slice(self, i: int) -> slice:
        return slice(i * self.b, (i + 1) * self.b)

    def add(
        self,
        lane: _Lane,
        canvas: torch.Tensor,
        self_cond: torch.Tensor | None,
        argmax: torch.Tensor,
        finished: torch.Tensor,
        history: torch.Tensor | None,
    ) -> None:
        """Append `lane`'s rows (it joins the step loop)."""
        if not self.lanes:
            self.canvas, self.self_cond, self.argmax, self.finished, self.history = (
                canvas,
                self_cond,
                argmax,
                finished,
                history,
            )
        else:
            # Lanes meet at one step, where every lane has had a previous step or none has.
            assert (self_cond is None) == (self.self_cond is None) and (history is None) == (self.history is None)
            self.canvas = torch.cat([self.canvas, canvas])
            self.self_cond = None if self_cond is None else torch.cat([self.self_cond, self_cond])
            self.argmax = torch.cat([self.argmax, argmax])
            self.finished = torch.cat([self.finished, finished])
            self.history = None if history is None else torch.cat([self.history, history], 1)
        self.lanes.append(lane)

    def rows_of(self, lanes: list[_Lane]) -> torch.Tensor:
        """Row indices of `lanes` (in their order) in the batch."""
        b = self.b
        parts = [torch.arange(self.lanes.index(lane) * b, (self.lanes.index(lane) + 1) * b) for lane in lanes]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def keep(self, lanes: list[_Lane]) -> None:
        """Drop every lane not in `lanes` (they left the step loop)."""
        if not lanes:
            self.lanes = []
            return
        rows = self.rows_of(lanes).to(self.canvas.device)
        self.canvas, self.argmax, self.finished = self.canvas[rows], self.argmax[rows], self.finished[rows]
        self.self_cond = None if self.self_cond is None else self.self_cond[rows]
        self.history = None if self.history is None else self.history[:, rows]
        self.lanes = list(lanes)


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
    base, patch, mode="free", fork_at=step)` returns), all run as one batch; and how many batched
    decoder passes that took. `kept`: the logits each run keeps (default: every step)."""
    if not batchable(base):
        raise ValueError("batched free cells need a base run from record_run with ReplayNoise and row-wise settings")
    cfg, ctx = model.cfg, model.hook_ctx
    kwargs = base.generate_kwargs
    settings = base.settings
    transform = kwargs.get("bottleneck") or kwargs.get("self_cond_transform")
    kept = kept if kept is not None else [KeptLogits("all")] * len(patches)
    device = base.input_ids.device
    rows_per_lane, prompt_len = base.input_ids.shape
    length, n_steps = cfg.canvas_length, settings.max_denoising_steps
    n_canvases = math.ceil(settings.max_new_tokens / length)
    max_length = prompt_len + settings.max_new_tokens
    eos_ids, pad_id = settings.eos_ids(cfg), settings.pad_id(cfg)
    eos_tensor = torch.tensor(eos_ids, device=device) if eos_ids else None
    noise = PerCellNoise(kwargs["noise"], rows_per_lane)
    if prompt_state is None:
        with torch.inference_mode():
            prompt_state = encode_through(model, base, 0)
        ctx.reset()
    lanes = [
        _Lane(
            step,
            keep,
            dict(patch.hooks(model, settings.max_denoising_steps)),
            base.input_ids,
            torch.zeros(rows_per_lane, dtype=torch.bool, device=device),
        )
        for patch, step, keep in zip(patches, fork_steps, kept, strict=True)
    ]
    rows = _Rows(rows_per_lane)
    hooks = [(name, _dispatch(name, rows)) for name in dict.fromkeys(n for lane in lanes for n in lane.appliers)]
    passes = 0
    try:
        with torch.inference_mode(), model.hooks_for_run(fwd_hooks=hooks):
            live = list(lanes)  # lanes in this canvas, in row order of `canvas_state`
            canvas_state = prompt_state
            for canvas_index in range(n_canvases):
                ctx.canvas, ctx.step, ctx.t = canvas_index, None, None
                stopper = StableAndConfident(settings.stability_threshold, settings.confidence_threshold)
                for lane in live:
                    lane.records.append({})
                    lane.final_argmax = None
                if canvas_index == 0:
                    joining: dict[int, list[_Lane]] = {}
                    for lane in live:
                        joining.setdefault(lane.fork_step, []).append(lane)
                else:
                    rows.lanes = live  # the encoder's rows, should a hook read them
                    new_tokens = torch.cat([lane.sequences[:, -length:] for lane in live])
                    previous = canvas_state if canvas_index > 1 else _expanded(prompt_state, len(live))
                    canvas_state = model.encode(new_tokens, torch.ones_like(new_tokens, dtype=torch.bool), previous)
                    start = noise.initial_canvas(len(new_tokens), length, cfg.vocab_size, device, canvas_index)
                    rows.lanes = []
                    for i, lane in enumerate(live):
                        part = slice(i * rows_per_lane, (i + 1) * rows_per_lane)
                        history = _blank_history(settings, start[part])
                        finished = torch.zeros(rows_per_lane, dtype=torch.bool, device=device)
                        rows.add(lane, start[part], None, start[part], finished, history)
                    joining = {}
                changed, state = True, None
                for step, t in enumerate(reversed(range(1, n_steps + 1))):
                    joiners = joining.pop(step, [])
                    fork = fork_state(model, base, step, prompt_state) if joiners else None
                    for lane in joiners:
                        lane.records[0] = {name: list(values) for name, values in fork.trace_prefix.items()}
                        history = fork.stop_history.to(device) if fork.stop_history is not None else None
                        if history is None:
                            history = _blank_history(settings, fork.canvas.to(device))
                        self_cond = None if fork.self_cond is None else fork.self_cond.to(device)
                        rows.add(
                            lane,
                            fork.canvas.to(device),
                            self_cond,
                            fork.argmax_canvas.to(device),
                            fork.finished.to(device),
                            history,
                        )
                        changed = True
                    if not rows.lanes:
                        if joining:
                            continue
                        break
                    if changed:
                        state = _state_for(rows.lanes, live, canvas_index, prompt_state, canvas_state)
                        changed = False
                    stopper.history = rows.history
                    out = denoising_step(
                        model,
                        settings,
                        noise,
                        canvas_index,
                        step,
                        t,
                        rows.canvas,
                        state,
                        rows.self_cond,
                        rows.argmax,
                        rows.finished,
                        stopper,
                    )
                    passes += 1
                    _record(rows, out, canvas_index, step, t, settings.record_top_k)
                    self_cond = out.logits.to(model.dtype)
                    if transform is not None:
                        self_cond = torch.cat([transform(self_cond[rows.slice(i)]) for i in range(len(rows.lanes))])
                    rows.canvas, rows.self_cond, rows.argmax = out.next_canvas, self_cond, out.argmax
                    rows.finished, rows.history = out.finished, stopper.history
                    done = [lane for i, lane in enumerate(rows.lanes) if bool(out.finished[rows.slice(i)].all())]
                    if done:
                        for lane in done:
                            lane.final_argmax = rows.argmax[rows.slice(rows.lanes.index(lane))]
                        rows.keep([lane for lane in rows.lanes if lane not in done])
                        changed = True
                    if not rows.lanes and not joining:
                        break
                for i, lane in enumerate(rows.lanes):
                    lane.final_argmax = rows.argmax[rows.slice(i)]
                rows.keep([])
                still = []
                for lane in live:
                    lane.records[-1] = _canvas_trace(lane.records[-1])
                    sequences = torch.cat([lane.sequences, lane.final_argmax], dim=-1)
                    lane.sequences, lane.finished_rows = _finalize_canvas(
                        sequences, lane.finished_rows, max_length, length, eos_tensor, pad_id
                    )
                    if not bool(lane.finished_rows.all()):
                        still.append(lane)
                if not still:
                    break
                if canvas_index > 0 and len(still) < len(live):
                    keep = [i for i, lane in enumerate(live) if lane in still]
                    index = torch.cat([torch.arange(i * rows_per_lane, (i + 1) * rows_per_lane) for i in keep])
                    canvas_state = canvas_state.select(index.to(device))
                live = still
    finally:
        ctx.reset()
    trace_settings = _settings_dict(settings, kwargs["noise"], eos_ids, pad_id)
    fingerprint = model_fingerprint(model)
    runs = []
    for lane in lanes:
        logits = {(0, s): base.logits[(0, s)] for s in range(lane.fork_step)}
        logits.update(lane.logits)
        trace = DenoisingTrace(lane.records, prompt_len, trace_settings, fingerprint)
        runs.append(
            PatchedRun(base.input_ids, base.attention_mask, "free", trace, logits, lane.sequences, None, kwargs)
        )
    return runs, passes


def _expanded(state: PromptState, lanes: int) -> PromptState:
    return state if lanes == 1 else expand_state(state, lanes)


def _state_for(active, live, canvas_index, prompt_state, canvas_state) -> PromptState:
    """The prompt state of the lanes in the step loop."""
    if canvas_index == 0:
        return _expanded(prompt_state, len(active))
    if active == live:
        return canvas_state
    b = canvas_state.batch_size // len(live)
    index = torch.cat([torch.arange(live.index(lane) * b, (live.index(lane) + 1) * b) for lane in active])
    return canvas_state.select(index.to(canvas_state.attention_mask.device))


def _blank_history(settings: GenerationSettings, like: torch.Tensor) -> torch.Tensor | None:
    """The stopping rule's history before any draft (what `StableAndConfident` starts from)."""
    if settings.stability_threshold == 0:
        return None
    return torch.full((settings.stability_threshold, *like.shape), -1, dtype=like.dtype, device=like.device)


def _record(rows: _Rows, out: Any, canvas_index: int, step: int, t: int, top_k: int) -> None:
    """Each lane's rows of this step: its trace row and the logits its metric may read."""
    values = {
        "input_canvas": rows.canvas,
        "sampled": out.sampled,
        "argmax": out.argmax,
        "entropy": out.entropy,
        "accepted": out.accepted,
        "next_canvas": out.next_canvas,
        "finished": out.finished,
    }
    values = {name: value.detach().cpu() for name, value in values.items()}
    if top_k:
        top = torch.topk(out.probs, k=min(top_k, out.probs.shape[-1]), dim=-1)
        values["top_k_tokens"], values["top_k_probs"] = top.indices.cpu(), top.values.cpu()
    temperature, t_value = out.temperature.detach().cpu().reshape(()), torch.tensor(t)
    for i, lane in enumerate(rows.lanes):
        part = rows.slice(i)
        record = lane.records[-1]
        for name, value in values.items():
            record.setdefault(name, []).append(value[part].clone())
        record.setdefault("temperature", []).append(temperature)
        record.setdefault("t", []).append(t_value)
        lane.kept.keep(lane.logits, canvas_index, step, out.raw[part])


def _dispatch(name: str, rows: _Rows) -> Callable:
    """The hook at `name` for the whole batch: each lane's patch on its own rows."""

    def apply_each(value: torch.Tensor, hook: Any) -> torch.Tensor | None:
        parts, changed = [], False
        for i, lane in enumerate(rows.lanes):
            part = value[rows.slice(i)]
            apply = lane.appliers.get(name)
            patched = apply(part, hook) if apply is not None else None
            if patched is not None:
                part, changed = patched, True
            parts.append(part)
        return torch.cat(parts) if changed else None

    return apply_each
