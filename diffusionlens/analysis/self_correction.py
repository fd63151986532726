"""Retroactive self-correction: a token the sampler had settled on is later replaced.

Every denoising step re-predicts every position, so a token accepted into the canvas (or a draft
token that stayed the argmax for a while) can still be overturned. An event is recorded when a
position *holds* a token and a later step's argmax at that position is a different token:

- `mode="accepted"`: a position holds token x from the step s at which x was accepted into the
  canvas (`accepted[s]`, x = `sampled[s]`; when the draw was not that step's argmax the event says
  so with `held_was_argmax=False`: the model overruled a sampling accident rather than its own draft);
- `mode="stable"`: it holds x once the argmax has been x for `min_stable` consecutive steps (the
  hold starts at the first of them).

After an event the position holds nothing until it is accepted (or stable) again, so a flickering
position yields one event per re-established token, not one per step. Only steps up to each row's
stop step are read (a stopped row's argmax is frozen). `search_corrections` runs a model over
prompts × seeds with reproducible noise and collects the events.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Int

from diffusionlens.analysis.commit_order import answer_mask, resolve_mask
from diffusionlens.analysis.seeds import SeededBatch, generate_over_seeds
from diffusionlens.sampling.trace import CanvasTrace

if TYPE_CHECKING:
    from diffusionlens.model import HookedDiffusionGemma

MODES = ("accepted", "stable")


@dataclass(frozen=True)
class CorrectionEvent:
    """Position `position` of row `row` held `old_token` from `step_held` (accepted there, or the first
    step of its stable run) until step `step_replaced`, whose argmax was `new_token`.

    Fields (steps are 0-based denoising steps in execution order, as `hook.ctx.step` and the trace's step
    axis; positions are canvas positions, 0 … canvas_length - 1):

    - row: the batch row of the trace searched (0 in a `CorrectionSearch`, whose runs are generated alone).
    - position: the canvas position where the held token was overturned.
    - step_held: the step the old token began to be held: accepted into the canvas there ("accepted"), or
      the first step of its run of `min_stable` equal argmaxes ("stable").
    - step_replaced: the first step whose argmax at `position` was not the held token.
    - old_token / new_token: the held token id, and that step's argmax id that replaced it.
    - final_token: the token the canvas ended with at `position` (the last step's argmax).
    - held_was_argmax: False when the accepted token was a sampled token other than that step's argmax (the
      sampler's draw was overruled, not the model's own draft); always True in "stable" mode.
    - persisted (property): `new_token == final_token`, the correction stuck.
    """

    row: int
    position: int
    step_held: int
    step_replaced: int
    old_token: int
    new_token: int
    final_token: int
    held_was_argmax: bool = True

    @property
    def persisted(self) -> bool:
        """Whether the replacement is the final token (the correction stuck)."""
        return self.new_token == self.final_token

    def describe(self, tokenizer: Any) -> str:
        """One line of text, e.g. `row 0, position 1: '8' held from step 0 -> '9' at step 3 (final '9')`."""
        old, new, final = (tokenizer.decode([t]) for t in (self.old_token, self.new_token, self.final_token))
        drawn = "" if self.held_was_argmax else ", a sampled non-argmax token"
        return (
            f"row {self.row}, position {self.position}: {old!r} held from step {self.step_held}{drawn} -> {new!r} "
            f"at step {self.step_replaced} (final {final!r})"
        )


def find_corrections(
    trace: CanvasTrace,
    mode: str = "accepted",
    min_stable: int = 2,
    mask: Bool[torch.Tensor, "batch canvas"] | None = None,
) -> list[CorrectionEvent]:
    """Self-correction events of one canvas trace, ordered by (row, step replaced, position).

    `mode`: "accepted" (held from acceptance) or "stable" (held after `min_stable` equal argmaxes);
    `mask` `[batch, canvas]` restricts the positions searched (e.g. `answer_mask(trace, eos_id)`).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if min_stable < 1:
        raise ValueError(f"min_stable must be >= 1, got {min_stable}")
    argmax, sampled, accepted = trace.argmax.cpu(), trace.sampled.cpu(), trace.accepted.cpu()
    mask = resolve_mask(mask, argmax.shape[1:])
    stop = trace.stop_step().cpu()
    final = argmax[-1]
    held = torch.full_like(argmax[0], -1)
    held_step = torch.full_like(argmax[0], -1)
    held_argmax = torch.ones_like(mask)
    run = torch.zeros_like(argmax[0])
    found: list[tuple[int, int, int, int, int, int, int, bool]] = []
    for step in range(trace.n_steps):
        current = argmax[step]
        live = mask & (step <= stop)[:, None]
        replaced = live & (held >= 0) & (current != held)
        for row, pos in torch.nonzero(replaced).tolist():
            old, new = int(held[row, pos]), int(current[row, pos])
            first = int(held_step[row, pos])
            found.append((row, step, pos, first, old, new, int(final[row, pos]), bool(held_argmax[row, pos])))
        held = torch.where(replaced, torch.full_like(held, -1), held)
        run = run + 1 if step == 0 else torch.where(current == argmax[step - 1], run + 1, torch.ones_like(run))
        if mode == "accepted":
            start = live & (held < 0) & accepted[step]
            held = torch.where(start, sampled[step], held)
            held_step = torch.where(start, torch.full_like(held_step, step), held_step)
            held_argmax = torch.where(start, sampled[step] == current, held_argmax)
        else:
            start = live & (held < 0) & (run >= min_stable)
            held = torch.where(start, current, held)
            held_step = torch.where(start, step - run + 1, held_step)
    return [
        CorrectionEvent(r, p, step_held=h, step_replaced=s, old_token=o, new_token=n, final_token=f, held_was_argmax=a)
        for r, s, p, h, o, n, f, a in sorted(found)
    ]


def correction_counts(events: Iterable[CorrectionEvent], canvas_length: int) -> Int[torch.Tensor, " canvas"]:
    """Number of events at each canvas position `[canvas]`."""
    counts = torch.zeros(canvas_length, dtype=torch.long)
    for event in events:
        counts[event.position] += 1
    return counts


@dataclass(frozen=True)
class FoundCorrection:
    """One self-correction event found by `search_corrections`.

    - prompt, seed: the run: `model.generate(model.to_tokens(prompt), noise=ReplayNoise(seed), ...)` with the
      search's generate keywords reproduces it.
    - canvas: the canvas of that run the event happened in (0 for the first `canvas_length` tokens).
    - event: the `CorrectionEvent` (its `row` is 0, the row of that run generated alone; its steps count
      within `canvas`, so patch or cache it with `canvas=canvas`, `step=event.step_replaced`).
    """

    prompt: str
    seed: int
    canvas: int
    event: CorrectionEvent


@dataclass
class CorrectionSearch:
    """Events collected by `search_corrections` over `prompts` × `seeds`.

    - prompts, seeds: what was searched, in the order given (`n_runs` = their product).
    - canvas_length: the model's canvas length (the length of `counts_by_position()`).
    - mode: "accepted" or "stable", the hold rule the events were found with (see the module docstring).
    - events: every `FoundCorrection`, ordered by run (prompts × seeds in generation order), then canvas,
      then (step replaced, position).
    - finals: per (prompt, seed), the generated tokens after the prompt (`result.new_tokens()` of that
      row, pad after eos), to read what a run ended with without generating it again.

    Queries: `where(position, prompt)` (events), `counts_by_position()`, `counts_by_prompt()`,
    `runs_with_event(position, prompt)` (runs with at least one event).
    """

    prompts: list[str]
    seeds: list[int]
    canvas_length: int
    mode: str
    events: list[FoundCorrection] = field(default_factory=list)
    finals: dict[tuple[str, int], Int[torch.Tensor, " generated"]] = field(default_factory=dict)

    @property
    def n_runs(self) -> int:
        return len(self.prompts) * len(self.seeds)

    def where(self, position: int | None = None, prompt: str | None = None) -> list[FoundCorrection]:
        """Events at one position and/or for one prompt."""
        return [
            e
            for e in self.events
            if (position is None or e.event.position == position) and (prompt is None or e.prompt == prompt)
        ]

    def counts_by_position(self) -> Int[torch.Tensor, " canvas"]:
        """Events per canvas position `[canvas]`, over all runs and canvases."""
        return correction_counts((e.event for e in self.events), self.canvas_length)

    def counts_by_prompt(self) -> dict[str, int]:
        """Events per prompt (every prompt listed, zeros included)."""
        counts = Counter(e.prompt for e in self.events)
        return {p: counts.get(p, 0) for p in self.prompts}

    def runs_with_event(self, position: int | None = None, prompt: str | None = None) -> int:
        """Number of (prompt, seed) runs with at least one event (at `position`, for `prompt`)."""
        return len({(e.prompt, e.seed) for e in self.where(position, prompt)})


def search_corrections(
    model: HookedDiffusionGemma,
    prompts: Sequence[str] | str,
    seeds: Iterable[int],
    *,
    mode: str = "accepted",
    min_stable: int = 2,
    answer_only: bool = True,
    batch_size: int = 64,
    progress: bool = True,
    on_batch: Callable[[SeededBatch], None] | None = None,
    **generate_kwargs: Any,
) -> CorrectionSearch:
    """Generate every prompt with every seed and collect self-correction events.

    Runs come from `generate_over_seeds` (`batch_size` rows at a time, a tqdm bar unless
    `progress=False`); row (prompt, seed) draws the random numbers of `ReplayNoise(seed)` alone, so
    any event can be reproduced with `model.generate(model.to_tokens(prompt), noise=ReplayNoise(seed), ...)`.
    `answer_only` searches only positions before the first eos of the final canvas. `generate_kwargs` go to `generate`
    (default `max_new_tokens`: one canvas; `noise` and `progress` are set here). `on_batch`, if given,
    is called with every `SeededBatch`, to run other analyses on the same generations.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    seeds = [int(s) for s in seeds]
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    eos = generate_kwargs.get("eos_token_id", model.cfg.eos_token_ids)
    eos = () if eos is None else eos
    pad = generate_kwargs.get("pad_token_id", model.cfg.pad_token_id)
    length = model.cfg.canvas_length
    search = CorrectionSearch(prompts, seeds, length, mode)
    batches = generate_over_seeds(
        model,
        prompts,
        seeds,
        batch_size=batch_size,
        progress=progress,
        desc="self-correction search",
        **generate_kwargs,
    )
    for batch in batches:
        if on_batch is not None:
            on_batch(batch)
        new = batch.result.new_tokens().cpu()
        for row, key in enumerate(batch.runs):
            search.finals[key] = new[row]
        for c, trace in enumerate(batch.result.trace.canvases):
            mask = answer_mask(trace, eos).cpu() if answer_only else torch.ones_like(trace.final, dtype=torch.bool)
            if c > 0 and pad is not None:  # rows that ended in an earlier canvas generate only padding
                mask &= ~(new[:, c * length : (c + 1) * length] == pad).all(-1, keepdim=True)
            for event in find_corrections(trace, mode, min_stable, mask.cpu()):
                prompt, seed = batch.runs[event.row]
                search.events.append(FoundCorrection(prompt, seed, c, replace(event, row=0)))
    return search
