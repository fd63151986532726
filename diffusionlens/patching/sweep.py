"""Patching sweeps over two axes (layer × position, step × position, layer × step, layer × head).

Every cell patches the clean run's values into the corrupted run and scores the result; only the
clean run's recorded activations and one patched run are alive at a time.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from itertools import product
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from diffusionlens.cache.selectors import resolve_layers
from diffusionlens.patching.free_fast import FreeCell, batchable, free_fast_sweep
from diffusionlens.patching.frozen_fast import Cell, frozen_fast_sweep, start_of
from diffusionlens.patching.metrics import sweep_metric_reads, with_token_ids
from diffusionlens.patching.runs import PatchedRun, fork_state, run_patched
from diffusionlens.patching.spec import Patch
from diffusionlens.sampling.noise import ReplayNoise, RowReplayNoise

if TYPE_CHECKING:
    from diffusionlens.model import HookedDiffusionGemma

AXES = {("layer", "position"), ("step", "position"), ("layer", "step"), ("layer", "head")}


@dataclass
class SweepResult:
    """values `[len(labels[axes[0]]), len(labels[axes[1]])]` with the label of every row and column.
    `stats`: how this run went (fast path: chunks run, bytes of block inputs held); not saved, and not
    part of the result, since it depends on how the cells were split (e.g. over Ray workers)."""

    values: torch.Tensor
    axes: tuple[str, ...]  # two for a sweep; attribution patching adds a third
    labels: dict[str, list]
    metadata: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def plot(self, ax=None, title: str | None = None):
        """A heatmap (matplotlib Figure); needs the `viz` extra."""
        from diffusionlens.viz import plot_sweep

        return plot_sweep(self, ax=ax, title=title)

    def save(self, path: str | Path) -> Path:
        """Write `sweep.safetensors` (values) and `sweep.json` (axes, labels, metadata) into directory `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({"values": self.values.detach().float().contiguous().cpu()}, str(path / "sweep.safetensors"))
        meta = {"format_version": 1, "axes": list(self.axes), "labels": self.labels, "metadata": self.metadata}
        (path / "sweep.json").write_text(json.dumps(meta, indent=1, default=str))
        return path

    @classmethod
    def load(cls, path: str | Path) -> SweepResult:
        path = Path(path)
        meta = json.loads((path / "sweep.json").read_text())
        if meta.get("format_version", 0) > 1:
            raise ValueError(f"{path} was written by a newer diffusionlens; upgrade diffusionlens to read it")
        values = load_file(str(path / "sweep.safetensors"))["values"]
        return cls(values, tuple(meta["axes"]), meta["labels"], meta["metadata"])

    def table(self, digits: int = 2) -> str:
        """The values as a text table, rows = first axis, columns = second axis."""
        rows, cols = self.axes
        header = f"{rows}\\{cols}".ljust(10) + "".join(f"{c!s:>{digits + 6}}" for c in self.labels[cols])
        lines = [header]
        for label, row in zip(self.labels[rows], self.values.tolist(), strict=True):
            lines.append(f"{label!s:<10}" + "".join(f"{v:>{digits + 6}.{digits}f}" for v in row))
        return "\n".join(lines)

    def argmax(self) -> tuple:
        flat = int(self.values.flatten().argmax())
        row, col = divmod(flat, self.values.shape[1])
        return self.labels[self.axes[0]][row], self.labels[self.axes[1]][col]


def patch_sweep(
    model: HookedDiffusionGemma,
    clean: PatchedRun,
    corrupted: PatchedRun,
    hook: str,
    over: tuple[str, str],
    metric: Callable[[PatchedRun], float],
    *,
    mode: str = "frozen",
    layers: Sequence[int] | None = None,
    steps: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    metric_steps: Sequence[int] | str | None = None,
    progress: bool = True,
    path: str = "fast",
    batch_size: int | None = None,
    max_bytes: int | None = None,
) -> SweepResult:
    """Patch `hook` (a name, with `{layer}` where the layer goes) from `clean` into `corrupted`, one
    cell at a time, and score each patched run with `metric`.

    Cells patch at one (layer, position), (step, position), (layer, step) or (layer, head); the other
    coordinates cover everything (all steps, all positions). `clean` must have recorded the hook
    (`record_run(..., names_filter=...)`). In frozen mode each cell re-runs only the steps the metric
    reads (`metric_steps`, default: the last step; a step-axis cell re-runs its own step too).
    `metric_steps="cell"` (frozen step sweeps) scores each cell at its own step: the metric must have a
    `step` field (LogitDiff, TargetProb, KLToClean), which is set to the cell's step.

    `path="fast"` (default) recomputes only what a patch can change (see `docs/patching.md`): frozen
    cells start at the patched decoder block from the corrupted run's cached block input and run
    `batch_size` cells (default 16, or as many as `max_bytes` holds) along the batch axis; free cells
    fork the corrupted run at their first patched step and, given `batch_size` or `max_bytes`, run that
    many cells as one generation (default one cell at a time), each cell stopping as its own run does.
    `path="reference"` runs every cell as its own `run_patched`. The fast path agrees with it bit for bit
    with one cell per chunk; batched frozen cells to float32 rounding (1e-5); batched free cells bit for
    bit where the kernels give a row the same numbers whatever the batch, else the rounding difference
    is carried through the later steps of the run (docs/patching.md, "Agreement"). Hooks the fast path
    cannot start later (encoder, sampler) take the reference path; `metadata["path"]` says which ran.
    """
    if path not in ("fast", "reference"):
        raise ValueError(f"path must be 'fast' or 'reference', got {path!r}")
    metric = with_token_ids(metric, model)  # token text -> ids, refused here if it cannot be
    over = tuple(over)
    if over not in AXES:
        raise ValueError(f"over must be one of {sorted(AXES)}, got {over}")
    if "layer" in over and "{layer}" not in hook:
        raise ValueError("sweeping over layers needs '{layer}' in the hook name, e.g. 'decoder.blocks.{layer}.…'")
    if clean.cache is None:
        raise ValueError("clean must come from record_run (its cache is the patch source)")
    labels = sweep_labels(model, clean, corrupted, hook, over, layers=layers, steps=steps, positions=positions)
    per_cell = metric_steps == "cell"
    if per_cell and ("step" not in over or mode != "frozen" or not hasattr(metric, "step")):
        raise ValueError("metric_steps='cell' needs a frozen sweep over steps and a metric with a `step` field")
    n_steps = corrupted.trace.steps(0)
    read_steps = [] if per_cell else list(metric_steps) if metric_steps is not None else [n_steps - 1]
    cells = sweep_cells(clean, hook, over, labels, metric, read_steps, per_cell)
    engine = SweepEngine(model, corrupted, mode, path, batch_size, max_bytes, progress)
    values, fast, held = engine.run(cells)
    metadata = {
        "hook": hook,
        "mode": mode,
        "metric": repr(metric),
        # the steps a frozen cell re-runs for its metric; a free cell runs to its own end
        "metric_steps": "cell" if per_cell else read_steps if mode == "frozen" else None,
        "metric_reads": sweep_metric_reads(metric, mode, corrupted, per_cell),
        "path": "fast" if fast else "reference",
    }
    return SweepResult(
        values.view(len(labels[over[0]]), len(labels[over[1]])),
        over,
        {a: labels[a] for a in over},
        metadata,
        stats=held,
    )


def sweep_labels(
    model: HookedDiffusionGemma,
    clean: PatchedRun,
    corrupted: PatchedRun,
    hook: str,
    over: tuple[str, ...],
    *,
    layers: Sequence[int] | None,
    steps: Sequence[int] | None,
    positions: Sequence[int] | None,
) -> dict[str, list]:
    """The label of every coordinate a sweep can patch at (layers, steps, positions, heads), checked."""
    n_steps = corrupted.trace.steps(0)
    labels = {
        "layer": resolve_layers(layers, model.cfg.num_hidden_layers),
        "step": list(steps if steps is not None else range(min(n_steps, clean.trace.steps(0)))),
        "position": list(positions if positions is not None else range(model.cfg.canvas_length)),
        "head": list(range(model.cfg.num_attention_heads)),
    }
    outside = [s for s in labels["step"] if not _is_step_below(s, n_steps)]
    if outside:
        raise ValueError(
            f"steps {outside} are outside the corrupted run's first canvas, which ran steps 0..{n_steps - 1}: "
            f"give steps in that range (e.g. steps=range({n_steps}))"
        )
    if "{layer}" in hook and "layer" not in over and len(labels["layer"]) != 1:
        raise ValueError(
            f"the hook {hook!r} has a {{layer}} but the sweep is over {over}: give the one layer to patch, "
            f"e.g. layers=[2] (got {labels['layer'] if layers is not None else 'none'})"
        )
    return labels


def _is_step_below(step: object, n_steps: int) -> bool:
    try:
        return 0 <= operator.index(step) < n_steps
    except TypeError:
        return False


@dataclass
class SweepCells:
    """Every cell of a sweep, in row-major order: its patch, the steps a frozen re-run runs, its metric."""

    patches: list[Patch]
    run_steps: list[list[int]]
    metrics: list[Callable[[PatchedRun], float]]


def sweep_cells(
    clean: PatchedRun,
    hook: str,
    over: tuple[str, ...],
    labels: dict[str, list],
    metric: Callable[[PatchedRun], float],
    read_steps: list[int],
    per_cell: bool,
) -> SweepCells:
    """The patch of every cell (clean's values at its coordinates), the steps it re-runs, its metric."""
    fixed_layer = labels["layer"][0] if labels["layer"] else 0  # every cell's layer when layers are no axis
    name_of = (lambda layer: hook.format(layer=layer)) if "{layer}" in hook else (lambda layer: hook)
    # recorded_anywhere, not `in`: the self-conditioning input does not fire at step 0.
    missing = [n for n in {name_of(layer) for layer in labels["layer"]} if not clean.cache.recorded_anywhere(n)]
    if missing:
        raise ValueError(f"the clean run did not record {missing[:3]}…; pass them in record_run(names_filter=...)")
    cells = SweepCells([], [], [])
    for cell in product(labels[over[0]], labels[over[1]]):
        coords = dict(zip(over, cell, strict=True))
        cells.patches.append(
            Patch(
                name_of(coords.get("layer", fixed_layer)),
                clean.cache,
                steps=coords.get("step", "all"),
                positions=coords.get("position", "all"),
                heads=coords.get("head", "all"),
            )
        )
        cells.run_steps.append(sorted({*read_steps, coords["step"]}) if "step" in coords else read_steps)
        cells.metrics.append(replace(metric, step=coords["step"]) if per_cell else metric)
    return cells


@dataclass
class SweepEngine:
    """How a sweep's cells run: the frozen fast path, the batched free fast path, or one `run_patched`
    per cell (forked at its first patched step where the run allows)."""

    model: HookedDiffusionGemma
    corrupted: PatchedRun
    mode: str
    path: str
    batch_size: int | None
    max_bytes: int | None
    progress: bool

    def run(self, cells: SweepCells) -> tuple[torch.Tensor, bool, dict[str, Any]]:
        """Each cell's metric value, whether a fast path ran, and what it held."""
        model, corrupted, patches = self.model, self.corrupted, cells.patches
        chunking = {"batch_size": self.batch_size, "max_bytes": self.max_bytes, "progress": self.progress}
        if self.path == "fast" and self.mode == "frozen" and all(start_of(model, p.hook) is not None for p in patches):
            fast_cells = [
                Cell(i, patch, cell_metric, _fire_steps(patch, steps_run), steps_run)
                for i, (patch, cell_metric, steps_run) in enumerate(
                    zip(patches, cells.metrics, cells.run_steps, strict=True)
                )
            ]
            values, held = frozen_fast_sweep(model, corrupted, fast_cells, **chunking)
            return values, True, held
        # Free cells fork the corrupted run at their first patched step (the steps before it are the
        # corrupted run's own under replayed noise) and share its encoded prompt; encoder patches,
        # which change the prompt state itself, and TorchRNGNoise runs regenerate from the start.
        forkable = (
            self.path == "fast"
            and self.mode == "free"
            and isinstance(corrupted.generate_kwargs.get("noise"), ReplayNoise | RowReplayNoise)
            and not any(p.hook.startswith("encoder.") for p in patches)
        )
        fork_steps = [(p.steps if p.steps != "all" else 0) for p in patches]
        if forkable and batchable(corrupted):
            free_cells = [
                FreeCell(i, patch, cell_metric, step)
                for i, (patch, cell_metric, step) in enumerate(zip(patches, cells.metrics, fork_steps, strict=True))
            ]
            values, held = free_fast_sweep(model, corrupted, free_cells, **chunking)
            return values, True, held
        prompt_state = fork_state(model, corrupted, 0).prompt_state if forkable else None
        values = torch.empty(len(patches))
        for i in tqdm(range(len(patches)), desc="patch sweep", disable=not self.progress, leave=False):
            patched = run_patched(
                model,
                corrupted,
                patches[i],
                mode=self.mode,
                steps=cells.run_steps[i] if self.mode == "frozen" else None,
                fork_at=fork_steps[i] if forkable else None,
                prompt_state=prompt_state,
            )
            values[i] = cells.metrics[i](patched)
        return values, forkable, {}


def _fire_steps(patch: Patch, run_steps: list[int]) -> list[int]:
    """The re-run steps at which `patch` writes (at its other re-run steps the cell's logits are the
    corrupted run's own)."""
    return [s for s in run_steps if patch.steps == "all" or s == patch.steps]
