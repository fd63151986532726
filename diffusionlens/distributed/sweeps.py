"""Sweeps, seed searches and activation harvests split into Ray tasks.

Each task does exactly what the single-process code does for its share (a sweep row through
`patch_sweep`, a batch of `generate_over_seeds`, one prompt's `generate_with_cache` with its own
`ReplayNoise`), so results are identical to a single-process run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from diffusionlens.analysis.seeds import SeededBatch, seed_batches
from diffusionlens.cache.storage import check_target
from diffusionlens.distributed.pool import ModelPool
from diffusionlens.patching.sweep import SweepResult
from diffusionlens.patching.sweep_spec import SweepSpec, record_spec_runs, sweep_recorded_spec

if TYPE_CHECKING:
    from diffusionlens.cache.denoising import DenoisingCache
    from diffusionlens.model import HookedDiffusionGemma


# ---------------------------------------------------------------------- patch sweeps
def _prepared(model: Any, memo: dict, spec: SweepSpec) -> tuple:
    """The clean and corrupted runs and the metric, recorded once per worker (`record_spec_runs`, as
    `run_sweep_spec` records them)."""
    key = ("sweep", repr(spec))
    if key not in memo:
        memo[key] = record_spec_runs(spec, model)
    return memo[key]


def _sweep_labels(model: Any, memo: dict, spec: SweepSpec) -> dict[str, list]:
    clean, corrupted, _ = _prepared(model, memo, spec)
    n_steps = min(corrupted.trace.steps(0), clean.trace.steps(0))
    return {
        "layer": list(spec.layers if spec.layers is not None else range(model.cfg.num_hidden_layers)),
        "step": list(spec.steps if spec.steps is not None else range(n_steps)),
        "position": list(spec.positions if spec.positions is not None else range(model.cfg.canvas_length)),
        "head": list(range(model.cfg.num_attention_heads)),
    }


def _sweep_rows(model: Any, memo: dict, task: tuple[SweepSpec, list]) -> SweepResult:
    """Some rows of the sweep (labels of its first axis), through `run_sweep_spec`'s own sweep call."""
    spec, rows = task
    return sweep_recorded_spec(spec, model, _prepared(model, memo, spec), first_axis_labels=rows, progress=False)


def row_groups(spec: SweepSpec, rows: list, row_length: int) -> list[list]:
    """The rows each task runs, chosen so that a task's cells form the same chunks as in the whole
    single-process sweep (chunk shapes change float sums, so the values then agree bit for bit).

    Frozen cells are chunked within one hook (one layer) and one patched step, counting from the first
    cell of a row, so one row per task. Free cells run in order of their fork step (0 unless the cell
    patches one step), `batch_size` at a time (default one): with one, one row per task; with more,
    tasks of `k` consecutive rows, `k * row_length` a multiple of `batch_size`, in fork-step order (a
    step-row sweep's rows sorted by step); a sweep whose columns are steps orders its cells column by
    column, so it is one task."""
    chunk = spec.batch_size or 1
    if spec.mode != "free" or chunk == 1:
        return [[row] for row in rows]
    if spec.over[1] == "step":
        return [list(rows)]
    ordered = sorted(rows) if spec.over[0] == "step" else list(rows)
    per_task = chunk // math.gcd(chunk, row_length)
    return [ordered[first : first + per_task] for first in range(0, len(ordered), per_task)]


def run_sweep_spec_distributed(
    spec: SweepSpec,
    pool: ModelPool | None = None,
    *,
    address: str | None = None,
    num_workers: int = 2,
    progress: bool = True,
) -> SweepResult:
    """`run_sweep_spec` with one Ray task per row of the sweep (or per group of rows, `row_groups`),
    handed to whichever worker is free; equal to the single-process result bit for bit (docs/scale.md,
    "Exactness": workers run the driver's torch thread count, and tasks form the sweep's own chunks).
    A task whose worker dies is retried on a fresh worker up to `pool.max_retries` times, then
    `WorkItemFailed` names its rows.

    Pass a `pool` (its workers must hold `spec.model`), or let one start on `address` (None: local Ray).
    """
    own_pool = pool is None
    pool = pool or ModelPool(spec.model, num_workers=num_workers, address=address)
    axis = spec.over[0]
    try:
        (labels,) = pool.map(_sweep_labels, [spec], progress=False, label=lambda _: "recording the sweep's runs")
        groups = row_groups(spec, labels[axis], len(labels[spec.over[1]]))
        parts = pool.map(
            _sweep_rows,
            [(spec, group) for group in groups],
            progress=progress,
            desc="sweep rows",
            label=lambda task: f"sweep rows {axis}={task[1]}",
        )
    finally:
        if own_pool:
            pool.shutdown()
    row_values = {row: part.values[i] for group, part in zip(groups, parts, strict=True) for i, row in enumerate(group)}
    values = torch.stack([row_values[row] for row in labels[axis]])
    result = SweepResult(values, spec.over, {a: labels[a] for a in spec.over}, dict(parts[0].metadata))
    result.metadata.update({"clean": spec.clean, "corrupted": spec.corrupted, "model": spec.model})
    return result


# ---------------------------------------------------------------------- seeds and harvests
def _seed_batch(model: Any, memo: dict, task: tuple[list[tuple[str, int]], dict]) -> Any:
    from diffusionlens.analysis.seeds import run_seed_batch

    chunk, generate_kwargs = task
    return run_seed_batch(model, chunk, **generate_kwargs)


def generate_over_seeds_distributed(
    pool: ModelPool,
    prompts: Sequence[str] | str,
    seeds: Iterable[int],
    *,
    batch_size: int = 64,
    progress: bool = True,
    **generate_kwargs: Any,
) -> list[SeededBatch]:
    """`analysis.seeds.generate_over_seeds` with one Ray task per batch: the same batches (the same
    `seed_batches` split and checks, the same `run_seed_batch` on each), returned in order."""
    batches = seed_batches(prompts, seeds, batch_size, generate_kwargs)
    return pool.map(
        _seed_batch,
        [(chunk, generate_kwargs) for chunk in batches],
        progress=progress,
        desc="batches",
        label=lambda task: f"seed batch {task[0][:3]}{'…' if len(task[0]) > 3 else ''}",
    )


def harvest_run(
    model: HookedDiffusionGemma, prompt: str, path: str | Path, seed: int, **cache_kwargs: Any
) -> DenoisingCache:
    """One run of a harvest: `prompt` generated with `ReplayNoise(seed)` into a disk cache at `path`
    (what each task of `harvest_distributed` runs, and the single-process equivalent)."""
    from diffusionlens.sampling.noise import ReplayNoise

    _check_harvest_kwargs(cache_kwargs)
    _, cache = model.generate_with_cache(
        model.to_tokens(prompt),
        noise=ReplayNoise(seed),
        storage="disk",
        path=Path(path),
        progress=False,
        **cache_kwargs,
    )
    return cache


def _check_harvest_kwargs(cache_kwargs: dict[str, Any]) -> None:
    taken = sorted(set(cache_kwargs) & {"noise", "storage", "path"})
    if taken:
        raise ValueError(
            f"a harvest sets {', '.join(taken)} itself (ReplayNoise(seed) per run, a disk cache in out_dir/run_NNNNN): "
            "drop it; pass seeds= for the noise"
        )


def _harvest_one(model: Any, memo: dict, task: tuple[int, str, int, str, dict]) -> str:
    index, prompt, seed, out_dir, cache_kwargs = task
    path = Path(out_dir) / f"run_{index:05d}"
    # harvest_distributed checked every run directory up front; a task retried after its worker
    # died must replace the partial cache that worker left
    harvest_run(model, prompt, path, seed, **{**cache_kwargs, "overwrite": True})
    return str(path)


def _harvest_label(task: tuple[int, str, int, str, dict]) -> str:
    return f"harvest run {task[0]} ({task[1]!r})"


def harvest_distributed(
    pool: ModelPool,
    prompts: Sequence[str],
    out_dir: str | Path,
    *,
    seeds: int | Sequence[int] = 0,
    progress: bool = True,
    **cache_kwargs: Any,
) -> list[Path]:
    """`generate_with_cache(storage="disk")` for every prompt, one Ray task each; returns the cache
    directories (`out_dir/run_00000`, …; reopen with `DenoisingCache.load`). `out_dir` must be on a
    file system every worker writes to (local Ray, or a shared mount).

    Run i uses `ReplayNoise(seeds[i])` (one int: the same seed for every prompt), so it does not depend
    on which worker ran it or what ran there before, and a retried run (after a worker died) rewrites
    the same shards: the caches equal `harvest_run(model, prompt, path, seed, **cache_kwargs)` in one
    process. `cache_kwargs` go to `generate_with_cache` (names_filter, steps, max_new_tokens, …). A run
    directory that already holds anything is refused before any task starts, unless `overwrite=True`.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("give at least one prompt")
    per_prompt = [int(seeds)] * len(prompts) if isinstance(seeds, int) else [int(s) for s in seeds]
    if len(per_prompt) != len(prompts):
        raise ValueError(f"seeds has {len(per_prompt)} entries for {len(prompts)} prompts; give one each, or one int")
    _check_harvest_kwargs(cache_kwargs)
    for i in range(len(prompts)):
        check_target(Path(out_dir) / f"run_{i:05d}", bool(cache_kwargs.get("overwrite", False)))
    tasks = [(i, p, s, str(out_dir), cache_kwargs) for i, (p, s) in enumerate(zip(prompts, per_prompt, strict=True))]
    done = pool.map(_harvest_one, tasks, progress=progress, desc="harvest", label=_harvest_label)
    return [Path(p) for p in done]
