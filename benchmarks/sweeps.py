"""Case 7: patch sweeps, the fast path (start at the patched block, fork at the patched step, batch
the cells) against the per-cell reference path, interleaved in one process; ratios are fast /
reference (lower is better) and, for batching (frozen and free-running cells), batch b / batch 1 on
the same cells."""

from __future__ import annotations

from benchmarks.cases import row
from benchmarks.models import Pair
from benchmarks.timing import Timer
from diffusionlens.patching import LogitDiff, patch_sweep, record_run

HOOK = "decoder.blocks.{layer}.hook_resid_post"


def sweeps(pair: Pair, timer: Timer, quick: bool) -> list[dict]:
    ours, cfg = pair.ours, pair.ours.cfg
    kw = dict(max_new_tokens=cfg.canvas_length, max_denoising_steps=pair.steps, eos_token_id=None, pad_token_id=0)
    names = [HOOK.format(layer=i) for i in range(cfg.num_hidden_layers)]
    clean = record_run(ours, pair.prompt(3), names_filter=names, **kw)
    corrupted = record_run(ours, pair.prompt(4), **kw)
    metric = LogitDiff(position=0, good=3, bad=4)
    rows = []

    def sweep(over, path, **options):
        return lambda: patch_sweep(ours, clean, corrupted, HOOK, over, metric, path=path, progress=False, **options)

    # Frozen layer x position over every decoder layer.
    positions = list(range(2 if quick else 4))
    cells = cfg.num_hidden_layers * len(positions)
    t = timer.measure(
        {
            "fast": sweep(("layer", "position"), "fast", positions=positions),
            "reference": sweep(("layer", "position"), "reference", positions=positions),
        }
    )
    rows.append(
        row("7 frozen layer x position sweep, fast / per cell", t["fast"], t["reference"], 0.6, f"{cells} cells")
    )

    # Free-running step x position over every step the corrupted run took.
    free = dict(mode="free", layers=[0], positions=[0])
    n_steps = corrupted.trace.steps(0)
    t = timer.measure(
        {
            "fast": sweep(("step", "position"), "fast", **free),
            "reference": sweep(("step", "position"), "reference", **free),
        },
        repeats=2 if quick else None,
    )
    rows.append(
        row("7 free step x position sweep, fast / per cell", t["fast"], t["reference"], 0.6, f"{n_steps} cells")
    )

    # Batching: 32 cells that share a step and a block, in chunks of 1, 8 and 32.
    shared = dict(layers=[0], positions=list(range(min(32, cfg.canvas_length))))
    contenders = {b: sweep(("layer", "position"), "fast", batch_size=b, **shared) for b in (1, 8, 32)}
    t = timer.measure(contenders)
    for b in (8, 32):
        rows.append(
            row(f"7 frozen sweep, batch {b} / batch 1 ({ours.device.type})", t[b], t[1], None, "32 cells, layer 0")
        )

    # Free batching: 32 free-running cells (the first steps x positions), each forked at its step, in
    # chunks of 1, 8 and 32 cells; a chunk's cells join its batch at their fork step.
    free_steps = list(range(min(4, n_steps)))
    free_cells = dict(
        mode="free", layers=[0], steps=free_steps, positions=list(range(min(32 // len(free_steps), cfg.canvas_length)))
    )
    n_free = len(free_steps) * len(free_cells["positions"])
    contenders = {b: sweep(("step", "position"), "fast", batch_size=b, **free_cells) for b in (1, 8, 32)}
    t = timer.measure(contenders, repeats=2 if quick else None)
    for b in (8, 32):
        note = f"{n_free} cells (steps {free_steps[0]}-{free_steps[-1]} x positions), layer 0"
        rows.append(row(f"7 free sweep, batch {b} / batch 1 ({ours.device.type})", t[b], t[1], None, note))
    stats = contenders[32]().stats
    rows.append(
        row(
            "7 free sweep extra bytes (one chunk, estimate)",
            stats["bytes_per_cell"] * min(stats["cells_per_chunk"], n_free),
            None,
            None,
            f"{stats}",
            unit="B",
        )
    )

    # Peak extra memory: the corrupted run's block inputs for one step plus one chunk of cells.
    meta = sweep(("layer", "position"), "fast", positions=positions)().stats
    extra = meta["block_input_bytes"] + meta["bytes_per_cell"] * min(meta["cells_per_chunk"], cells)
    rows.append(row("7 sweep peak extra bytes (block inputs + one chunk)", extra, None, None, f"{meta}", unit="B"))
    return rows
