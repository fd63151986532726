"""Many reproducible runs: every prompt with every seed, batched, each row replayable on its own.

`RowReplayNoise(seeds)` gives row i of a batch exactly the random numbers `ReplayNoise(seeds[i])` gives a
batch of one, so a run found in a batched sweep is reproduced by
`model.generate(model.to_tokens(prompt), noise=ReplayNoise(seed))` whatever it was batched with
(up to the float effects of left-padding prompts of different lengths).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from diffusionlens.sampling.noise import RowReplayNoise

if TYPE_CHECKING:
    from diffusionlens.model import HookedDiffusionGemma
    from diffusionlens.sampling.generate import GenerationResult


@dataclass
class SeededBatch:
    """One batch of `generate_over_seeds`: `runs[i]` = (prompt, seed) of row i of `result`."""

    runs: list[tuple[str, int]]
    result: GenerationResult


def seed_batches(
    prompts: Sequence[str] | str, seeds: Iterable[int], batch_size: int, generate_kwargs: dict[str, Any]
) -> list[list[tuple[str, int]]]:
    """The (prompt, seed) rows of `generate_over_seeds`, every prompt with every seed (seed-major),
    split into batches of `batch_size`; refuses what the search cannot run (shared with
    `distributed.generate_over_seeds_distributed`, so both make the same batches)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    seeds = [int(s) for s in seeds]
    if not prompts or not seeds:
        raise ValueError("give at least one prompt and one seed")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if "noise" in generate_kwargs:
        raise ValueError("the noise is set per seed here (ReplayNoise); drop noise=")
    runs = [(p, s) for s in seeds for p in prompts]
    return [runs[start : start + batch_size] for start in range(0, len(runs), batch_size)]


def run_seed_batch(model: HookedDiffusionGemma, chunk: list[tuple[str, int]], **generate_kwargs: Any) -> SeededBatch:
    """Generate one batch of (prompt, seed) rows, row i with `RowReplayNoise` seed i (default
    `max_new_tokens`: one canvas)."""
    generate_kwargs = {"max_new_tokens": model.cfg.canvas_length, **generate_kwargs}
    ids, attention = model.to_tokens_and_mask([p for p, _ in chunk])
    noise = RowReplayNoise([s for _, s in chunk])
    result = model.generate(ids, attention_mask=attention, noise=noise, progress=False, **generate_kwargs)
    return SeededBatch(chunk, result)


def generate_over_seeds(
    model: HookedDiffusionGemma,
    prompts: Sequence[str] | str,
    seeds: Iterable[int],
    *,
    batch_size: int = 64,
    progress: bool = True,
    desc: str = "runs",
    **generate_kwargs: Any,
) -> Iterator[SeededBatch]:
    """Generate every prompt with every seed, `batch_size` rows at a time, yielding each batch.

    Row (prompt, seed) uses `RowReplayNoise`, so it is reproducible alone. `generate_kwargs` go to
    `generate` (default `max_new_tokens`: one canvas). `progress` shows a tqdm bar over runs.
    """
    batches = seed_batches(prompts, seeds, batch_size, generate_kwargs)
    bar = tqdm(total=sum(len(chunk) for chunk in batches), desc=desc, disable=not progress)
    try:
        for chunk in batches:
            yield run_seed_batch(model, chunk, **generate_kwargs)
            bar.update(len(chunk))
    finally:
        bar.close()
