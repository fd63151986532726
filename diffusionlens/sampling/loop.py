"""The canvas/step loop of block-diffusion generation, for one or many lanes at once.

A lane is one generation of B rows: a plain `generate` call is one lane; a batch of free-running
patched cells is many lanes side by side on the batch axis (lane i owns rows i*B … i*B+B-1), each
with its own hooks, all from the same prompt. Per canvas: encode what is new, start every lane from
fresh noise (or, in the first canvas, from a recorded run's state at the lane's join step), then
for up to N steps run `denoising_step` on the lanes in the loop, record each lane's trace row, feed
the scaled logits back as self-conditioning, and let a lane leave once all its rows have stopped
(where its own generation would break). Finished canvases are appended per lane, padded after eos.

Rows of a lane that stop earlier stay in the batch with their values held fixed (`denoising_step`
holds them), exactly as a one-lane generation holds them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float, Int
from tqdm.auto import tqdm

from diffusionlens.components.prompt_state import PromptState
from diffusionlens.sampling.noise import NoiseSource
from diffusionlens.sampling.sampler import StableAndConfident
from diffusionlens.sampling.settings import GenerationSettings
from diffusionlens.sampling.step import SelfCondTransform, StepOutput, denoising_step, next_self_conditioning
from diffusionlens.sampling.trace import OPTIONAL_STEP_FIELDS, STEP_FIELDS, CanvasTrace

if TYPE_CHECKING:
    from diffusionlens.cache.denoising import DenoisingCache
    from diffusionlens.config import DiffusionGemmaConfig
    from diffusionlens.model import HookedDiffusionGemma
    from diffusionlens.sampling.generate import ForkState


class TraceRecorder:
    """One lane's record of one canvas, a list per `CanvasTrace` field, one entry per step run."""

    def __init__(self, prefix: dict[str, list[torch.Tensor]] | None = None) -> None:
        self.rows: dict[str, list[torch.Tensor]] = {f.name: [] for f in fields(CanvasTrace)}
        for name, values in (prefix or {}).items():
            self.rows[name] = list(values)

    def append(self, values: dict[str, torch.Tensor], part: slice | None) -> None:
        """Add one step: `values` (from `step_values`) for the whole batch, of which this lane owns `part`
        (None: all of it)."""
        for name, value in values.items():
            per_row = name not in ("temperature", "t")
            self.rows[name].append(value[part].clone() if per_row and part is not None else value)

    def trace(self) -> CanvasTrace:
        return CanvasTrace(**{name: torch.stack(rows) for name, rows in self.rows.items() if rows})


def step_values(
    input_canvas: Int[torch.Tensor, "batch canvas"], out: StepOutput, t: int, record_top_k: int
) -> dict[str, torch.Tensor]:
    """One step's row of every `CanvasTrace` field, on the CPU (top-k only when `record_top_k`)."""
    values = {name: getattr(out, name) for name in STEP_FIELDS if name != "input_canvas"}
    values = {"input_canvas": input_canvas, **values}
    if record_top_k:
        top = torch.topk(out.probs, k=min(record_top_k, out.probs.shape[-1]), dim=-1)
        values.update(zip(OPTIONAL_STEP_FIELDS, (top.indices, top.values), strict=True))
    values = {name: value.detach().cpu() for name, value in values.items()}
    values["temperature"] = out.temperature.detach().cpu().reshape(())
    values["t"] = torch.tensor(t)
    return values


@dataclass(eq=False)
class Lane:
    """One generation in the batch. input_ids: its prompt (every lane of a loop has the same one);
    join_step: the step of the first canvas it enters at, from a recorded run's state there (0 and no
    fork: fresh noise); hooks: forward hooks applied to this lane's rows only, by hook name;
    keep_logits: called with (canvas, step, raw decoder logits of its rows) every step it runs.

    Filled by the loop: sequences (prompt and finished canvases, padded after eos), finished_rows
    (rows ended by eos or length), forward_passes (decoder passes per row while not stopped), canvases
    (one CanvasTrace per canvas)."""

    input_ids: Int[torch.Tensor, "batch pos"]
    join_step: int = 0
    hooks: dict[str, Callable] = field(default_factory=dict)
    keep_logits: Callable[[int, int, torch.Tensor], None] | None = None
    sequences: Int[torch.Tensor, "batch length"] = field(init=False)
    finished_rows: Bool[torch.Tensor, " batch"] = field(init=False)
    forward_passes: Int[torch.Tensor, " batch"] = field(init=False)
    canvases: list[CanvasTrace] = field(default_factory=list, init=False)
    recorder: TraceRecorder = field(default_factory=TraceRecorder, init=False)
    final_argmax: Int[torch.Tensor, "batch canvas"] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        rows, device = self.input_ids.shape[0], self.input_ids.device
        self.sequences = self.input_ids
        self.finished_rows = torch.zeros(rows, dtype=torch.bool, device=device)
        self.forward_passes = torch.zeros(rows, dtype=torch.int, device=device)

    @property
    def done(self) -> bool:
        return bool(self.finished_rows.all())


@dataclass
class LaneRows:
    """The lanes in the step loop, in row order, and the per-row values a step reads: the canvas, the
    self-conditioning input, the last draft, the stopped rows and the stopping rule's history."""

    rows_per_lane: int
    lanes: list[Lane] = field(default_factory=list)
    canvas: Int[torch.Tensor, "batch canvas"] | None = None
    self_cond: Float[torch.Tensor, "batch canvas vocab"] | None = None
    argmax: Int[torch.Tensor, "batch canvas"] | None = None
    finished: Bool[torch.Tensor, " batch"] | None = None
    history: Int[torch.Tensor, "threshold batch canvas"] | None = None

    def part(self, i: int) -> slice | None:
        """The rows of the i-th lane (None when it is the only one: all rows)."""
        if len(self.lanes) == 1:
            return None
        return slice(i * self.rows_per_lane, (i + 1) * self.rows_per_lane)

    def add(
        self,
        lane: Lane,
        canvas: Int[torch.Tensor, "rows canvas"],
        self_cond: Float[torch.Tensor, "rows canvas vocab"] | None,
        argmax: Int[torch.Tensor, "rows canvas"],
        finished: Bool[torch.Tensor, " rows"],
        history: Int[torch.Tensor, "threshold rows canvas"] | None,
    ) -> None:
        """Append `lane`'s rows: it joins the step loop."""
        values = (canvas, self_cond, argmax, finished, history)
        if not self.lanes:
            self.canvas, self.self_cond, self.argmax, self.finished, self.history = values
        else:
            # Lanes meet at one step, where every lane has had a previous step or none has.
            if (self_cond is None) != (self.self_cond is None) or (history is None) != (self.history is None):
                raise RuntimeError("lanes joined at one step from different points of a run; this is a bug")
            self.canvas = torch.cat([self.canvas, canvas])
            self.self_cond = None if self_cond is None else torch.cat([self.self_cond, self_cond])
            self.argmax = torch.cat([self.argmax, argmax])
            self.finished = torch.cat([self.finished, finished])
            self.history = None if history is None else torch.cat([self.history, history], 1)
        self.lanes.append(lane)

    def index_of(self, lanes: Sequence[Lane], among: Sequence[Lane]) -> Int[torch.Tensor, " rows"]:
        """Row indices of `lanes` in a batch holding the lanes `among`, in that order."""
        b = self.rows_per_lane
        parts = [torch.arange(among.index(lane) * b, (among.index(lane) + 1) * b) for lane in lanes]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def keep(self, lanes: list[Lane]) -> None:
        """Drop every lane not in `lanes` (they left the step loop)."""
        if not lanes:
            self.lanes = []
            return
        rows = self.index_of(lanes, self.lanes).to(self.canvas.device)
        self.canvas, self.argmax, self.finished = self.canvas[rows], self.argmax[rows], self.finished[rows]
        self.self_cond = None if self.self_cond is None else self.self_cond[rows]
        self.history = None if self.history is None else self.history[:, rows]
        self.lanes = list(lanes)


@dataclass(frozen=True)
class LoopRun:
    """What a loop runs with besides the model and its lanes: settings; noise (draws for the whole
    batch); the self-conditioning transform (applied to each lane's rows on their own); the cache told
    where each encoder pass and step ends; whether to show a progress bar."""

    settings: GenerationSettings
    noise: NoiseSource
    self_cond_transform: SelfCondTransform | None = None
    cache: DenoisingCache | None = None
    progress: bool = False


class DenoisingLoop:
    """Run `lanes` through every canvas and step (see the module docstring). `fork(step)` gives the
    state a recorded run was in at `step` of its first canvas, for lanes joining there."""

    def __init__(
        self,
        model: HookedDiffusionGemma,
        run: LoopRun,
        lanes: list[Lane],
        fork: Callable[[int], ForkState] | None = None,
    ) -> None:
        self.model, self.run, self.lanes, self.fork = model, run, lanes, fork
        self.settings = run.settings
        self.rows = LaneRows(lanes[0].input_ids.shape[0])
        self.passes = 0

    def lane_hooks(self) -> list[tuple[str, Callable]]:
        """The forward hooks that apply each lane's own hooks to its rows (install them for the run)."""
        names = dict.fromkeys(name for lane in self.lanes for name in lane.hooks)
        return [(name, dispatch_to_lanes(name, self.rows)) for name in names]

    def run_all(
        self,
        prompt_state: PromptState | None = None,
        attention_mask: Bool[torch.Tensor, "batch pos"] | None = None,
    ) -> int:
        """Generate every canvas; return the number of batched decoder passes. `prompt_state`: the
        prompt encoded (shared by every lane); None: encode it here (one lane only), with `attention_mask`."""
        if prompt_state is None and len(self.lanes) != 1:
            raise ValueError("several lanes share one prompt state: encode it first and pass prompt_state")
        cfg, settings = self.model.cfg, self.settings
        n_canvases = math.ceil(settings.max_new_tokens / cfg.canvas_length)
        total = n_canvases * settings.max_denoising_steps
        bar = tqdm(total=total, desc="denoising", disable=not self.run.progress, leave=False)
        live, canvas_state = list(self.lanes), None
        try:
            for canvas_index in range(n_canvases):
                self.model.hook_ctx.canvas, self.model.hook_ctx.step, self.model.hook_ctx.t = canvas_index, None, None
                if canvas_index == 0 and prompt_state is None:
                    prompt_state = self.model.encode(live[0].input_ids, attention_mask)
                elif canvas_index > 0:
                    canvas_state = self.encode_canvas(live, canvas_index, prompt_state, canvas_state)
                if self.run.cache is not None:
                    self.run.cache.end_encoder(canvas_index)
                self.run_steps(canvas_index, live, prompt_state, canvas_state, bar)
                bar.update((canvas_index + 1) * settings.max_denoising_steps - bar.n)
                still = [lane for lane in live if not self.end_canvas(lane)]
                if not still:
                    break
                if canvas_index > 0 and len(still) < len(live):
                    canvas_state = canvas_state.select(
                        self.rows.index_of(still, live).to(canvas_state.attention_mask.device)
                    )
                live = still
        finally:
            bar.close()
        return self.passes

    def encode_canvas(
        self, live: list[Lane], canvas_index: int, prompt_state: PromptState, previous: PromptState | None
    ) -> PromptState:
        """Encode the canvas each live lane finished last, appended to that lane's prompt state."""
        length = self.model.cfg.canvas_length
        self.rows.lanes = live  # the encoder's rows, should a lane's hook read them
        new_tokens = torch.cat([lane.sequences[:, -length:] for lane in live])
        if canvas_index == 1:
            previous = expand_state(prompt_state, len(live))
        state = self.model.encode(new_tokens, torch.ones_like(new_tokens, dtype=torch.bool), previous)
        self.rows.lanes = []
        return state

    def run_steps(
        self,
        canvas_index: int,
        live: list[Lane],
        prompt_state: PromptState,
        canvas_state: PromptState | None,
        bar: Any,
    ) -> None:
        """The step loop of one canvas: lanes join at their step, run, and leave once all rows stopped."""
        settings, rows = self.settings, self.rows
        stopper = StableAndConfident(settings.stability_threshold, settings.confidence_threshold)
        joining: dict[int, list[Lane]] = {}
        for lane in live:
            lane.recorder, lane.final_argmax = TraceRecorder(), None
            joining.setdefault(lane.join_step if canvas_index == 0 else 0, []).append(lane)
        changed, state = True, None
        for step, t in enumerate(reversed(range(1, settings.max_denoising_steps + 1))):
            if step in joining:
                self.join(joining.pop(step), canvas_index, step)
                changed = True
            if not rows.lanes:
                if joining:
                    continue
                break
            if changed:
                state = self.state_of_rows(live, canvas_index, prompt_state, canvas_state)
            stopper.history = rows.history
            out = self.step(canvas_index, step, t, state, stopper)
            changed = self.leave_if_stopped(out.finished)
            bar.update(1)
            if not rows.lanes and not joining:
                break
        for i, lane in enumerate(rows.lanes):
            lane.final_argmax = rows.argmax if rows.part(i) is None else rows.argmax[rows.part(i)]
        rows.keep([])

    def step(self, canvas_index: int, step: int, t: int, state: PromptState, stopper: StableAndConfident) -> StepOutput:
        """One denoising step of every lane in the loop, recorded per lane."""
        rows, model = self.rows, self.model
        for i, lane in enumerate(rows.lanes):
            part = rows.part(i)
            finished = rows.finished if part is None else rows.finished[part]
            lane.forward_passes += ~(finished | lane.finished_rows)
        out = denoising_step(
            model,
            self.settings,
            self.run.noise,
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
        self.passes += 1
        values = step_values(rows.canvas, out, t, self.settings.record_top_k)
        for i, lane in enumerate(rows.lanes):
            lane.recorder.append(values, rows.part(i))
            if lane.keep_logits is not None:
                lane.keep_logits(canvas_index, step, out.raw if rows.part(i) is None else out.raw[rows.part(i)])
        if self.run.cache is not None:
            self.run.cache.end_step(canvas_index, step)
        rows.canvas, rows.argmax, rows.finished = out.next_canvas, out.argmax, out.finished
        rows.self_cond, rows.history = self.next_self_cond(out.logits), stopper.history
        return out

    def next_self_cond(self, logits: Float[torch.Tensor, "batch canvas vocab"]) -> torch.Tensor:
        """The next step's self-conditioning input: this step's scaled logits, transformed lane by lane."""
        transform, rows, dtype = self.run.self_cond_transform, self.rows, self.model.dtype
        if transform is None or len(rows.lanes) == 1:
            return next_self_conditioning(logits, dtype, transform)
        parts = [logits[rows.part(i)] for i in range(len(rows.lanes))]
        return torch.cat([next_self_conditioning(part, dtype, transform) for part in parts])

    def leave_if_stopped(self, finished: Bool[torch.Tensor, " batch"]) -> bool:
        """Lanes whose rows have all stopped leave the step loop with their draft; whether any left."""
        rows = self.rows
        done = [lane for i, lane in enumerate(rows.lanes) if bool(finished[rows.part(i) or slice(None)].all())]
        for lane in done:
            i = rows.lanes.index(lane)
            lane.final_argmax = rows.argmax if rows.part(i) is None else rows.argmax[rows.part(i)]
        if done:
            rows.keep([lane for lane in rows.lanes if lane not in done])
        return bool(done)

    def join(self, joiners: list[Lane], canvas_index: int, step: int) -> None:
        """Lanes entering the step loop: from the recorded run's state at `step` of the first canvas,
        or (no fork, or a later canvas) from one fresh noise draw for all of them."""
        model, settings, device = self.model, self.settings, joiners[0].input_ids.device
        b = self.rows.rows_per_lane
        if canvas_index == 0 and self.fork is not None:
            fork = self.fork(step)
            canvas, argmax = fork.canvas.to(device), fork.argmax_canvas.to(device)
            self_cond = None if fork.self_cond is None else fork.self_cond.to(device)
            history = None if fork.stop_history is None else fork.stop_history.to(device).clone()
            for lane in joiners:
                lane.recorder = TraceRecorder(fork.trace_prefix)
                lane.forward_passes += fork.forward_passes.to(device)
                lane_history = history if history is not None else blank_history(settings, canvas)
                self.rows.add(lane, canvas, self_cond, argmax, fork.finished.to(device), lane_history)
            return
        length, vocab = model.cfg.canvas_length, model.cfg.vocab_size
        start = self.run.noise.initial_canvas(len(joiners) * b, length, vocab, device, canvas_index)
        for i, lane in enumerate(joiners):
            canvas = start if len(joiners) == 1 else start[i * b : (i + 1) * b]
            finished = torch.zeros(b, dtype=torch.bool, device=device)
            self.rows.add(lane, canvas, None, canvas, finished, blank_history(settings, canvas))

    def state_of_rows(
        self, live: list[Lane], canvas_index: int, prompt_state: PromptState, canvas_state: PromptState | None
    ) -> PromptState:
        """The prompt state of the lanes in the step loop (every lane shares the first canvas's)."""
        active = self.rows.lanes
        if canvas_index == 0:
            return expand_state(prompt_state, len(active))
        if active == live:
            return canvas_state
        return canvas_state.select(self.rows.index_of(active, live).to(canvas_state.attention_mask.device))

    def end_canvas(self, lane: Lane) -> bool:
        """Append the lane's finished canvas and its trace; whether all its rows have ended."""
        cfg, settings = self.model.cfg, self.settings
        lane.canvases.append(lane.recorder.trace())
        max_length = lane.input_ids.shape[1] + settings.max_new_tokens
        eos = torch.tensor(settings.eos_ids(cfg), device=lane.sequences.device) if settings.eos_ids(cfg) else None
        sequences = torch.cat([lane.sequences, lane.final_argmax], dim=-1)
        lane.sequences, lane.finished_rows = finalize_canvas(
            sequences, lane.finished_rows, max_length, cfg.canvas_length, eos, settings.pad_id(cfg)
        )
        return lane.done


def dispatch_to_lanes(name: str, rows: LaneRows) -> Callable:
    """The hook at `name` for the whole batch: each lane's own hook on its own rows."""

    def apply_each(value: torch.Tensor, hook: Any) -> torch.Tensor | None:
        parts, changed = [], False
        for i, lane in enumerate(rows.lanes):
            part = value[rows.part(i) or slice(None)]
            apply = lane.hooks.get(name)
            patched = apply(part, hook) if apply is not None else None
            if patched is not None:
                part, changed = patched, True
            parts.append(part)
        return torch.cat(parts) if changed else None

    return apply_each


def blank_history(settings: GenerationSettings, like: torch.Tensor) -> torch.Tensor | None:
    """The stopping rule's history before any draft (what `StableAndConfident` starts from)."""
    if settings.stability_threshold == 0:
        return None
    return torch.full((settings.stability_threshold, *like.shape), -1, dtype=like.dtype, device=like.device)


def expand_state(state: PromptState, copies: int) -> PromptState:
    """`state` repeated `copies` times along the batch, lane-major (row c*B + b is lane c, row b); the
    state itself for one copy. A one-row state is expanded as a view; several rows need one copy."""
    if copies == 1:
        return state

    def expand(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.shape[0] == 1:
            return tensor.expand(copies, *tensor.shape[1:])
        return tensor.unsqueeze(0).expand(copies, *tensor.shape).reshape(-1, *tensor.shape[1:])

    return PromptState(
        [expand(k) for k in state.keys],
        [expand(v) for v in state.values],
        expand(state.attention_mask),
        state.length,
        None,
    )


def finalize_canvas(
    sequences: Int[torch.Tensor, "batch length"],
    finished_rows: Bool[torch.Tensor, " batch"],
    max_length: int,
    length: int,
    eos_tensor: Int[torch.Tensor, " eos"] | None,
    pad_id: int | None,
) -> tuple[Int[torch.Tensor, "batch length"], Bool[torch.Tensor, " batch"]]:
    """Stop rows at max length or on eos; pad what follows eos and every canvas after a stop (in place
    on the last canvas of `sequences`)."""
    done_now = torch.full_like(finished_rows, sequences.shape[1] >= max_length)
    if eos_tensor is not None:
        done_now = done_now | torch.isin(sequences[:, -length:], eos_tensor).any(dim=-1)
    previously = finished_rows
    finished_rows = previously | done_now
    if pad_id is not None and bool(finished_rows.any()):
        sequences[previously, -length:] = pad_id
        if eos_tensor is not None and bool(done_now.any()):
            new = sequences[:, -length:]
            is_eos = torch.isin(new, eos_tensor)
            eos_count = is_eos.cumsum(dim=-1)
            new[(eos_count > 0) & ~((eos_count == 1) & is_eos)] = pad_id
    return sequences, finished_rows


def trace_settings(settings: GenerationSettings, noise: NoiseSource, cfg: DiffusionGemmaConfig) -> dict[str, Any]:
    """What a trace records as its settings: the six sampler numbers, the noise, eos and pad ids."""
    eos_ids, pad_id = settings.eos_ids(cfg), settings.pad_id(cfg)
    return {**settings.sampler_dict(), "noise": repr(noise), "eos_token_id": list(eos_ids), "pad_token_id": pad_id}
