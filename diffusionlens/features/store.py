"""ActivationStore: hook values harvested over prompts × seeds × steps × positions, on disk.

A store is a directory of safetensors shards plus `manifest.json`. Each shard holds, per hook, a
`[rows, d]` matrix (the hook's value at one (prompt, seed, canvas, step, position), trailing axes
flattened) and one label tensor per row field (`LABEL_FIELDS`). Rows are buffered in memory up to
`max_bytes`, then written as one shard; the manifest, rewritten atomically after every shard, lists
the shards and the (prompt, seed) units they hold, so an interrupted harvest resumes where it stopped
and never writes a unit twice. Each unit is generated with `RowReplayNoise`, so its rows do not depend
on which other units shared its batch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from diffusionlens.cache.selectors import Selector, select_indices
from diffusionlens.hooks.shapes import hook_specs
from diffusionlens.sampling.noise import RowReplayNoise
from diffusionlens.sampling.settings import SAMPLER_FIELDS, settings_of

if TYPE_CHECKING:
    from diffusionlens.model import HookedDiffusionGemma

STORE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LABEL_FIELDS = ("prompt_id", "seed", "canvas", "step", "position", "input_token", "final_token", "accepted")
_LABEL_PREFIX = "label."
# Generation settings that are plain values and so can be written to, and compared through, the manifest.
_SETTING_KEYS = ("max_new_tokens", *SAMPLER_FIELDS)


class StoreMismatchError(ValueError):
    """The store directory was written for another model, other hooks, filters, prompts or settings."""


def config_hash(model: HookedDiffusionGemma) -> str:
    """A short hash of the model's config (what decides the hooks' names and shapes)."""
    text = json.dumps(model.cfg.to_hf(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def weights_fingerprint(model: HookedDiffusionGemma) -> str:
    """A short hash of a slice of the embedding and the final norm: tells a retrained checkpoint of the
    same config apart, without reading every weight of a large model."""
    sample = torch.cat([model.decoder.embed.W_E.flatten()[:4096], model.decoder.ln_final.weight.flatten()])
    return hashlib.sha256(sample.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]


def _index_list(selector: Selector, size: int, what: str, size_name: str) -> list[int] | None:
    """The sorted indices `selector` picks out of `size` (None: all), as the manifest records them."""
    chosen = select_indices(selector, size, what, size_name)
    return None if chosen is None else sorted(chosen)


class ActivationStore:
    """Harvest `hooks` of `model` over `prompts` × `seeds` into `path`, or reopen a store there.

    Every argument is written to the manifest; reopening with a different model config, hooks,
    filters, prompts, seeds or generation settings raises `StoreMismatchError` naming what differs.
    `steps`, `positions`, `canvases` filter as in `generate_with_cache`; rows after a unit stopped
    (its later steps only exist because other rows of the batch were still running) are dropped.
    `batch_size` units are generated together; `max_bytes` bounds the rows held in memory.
    """

    def __init__(
        self,
        path: str | Path,
        model: HookedDiffusionGemma,
        hooks: str | Sequence[str],
        *,
        prompts: Sequence[str],
        seeds: Sequence[int] = (0,),
        steps: Selector = None,
        positions: Selector = None,
        canvases: Selector = None,
        batch_size: int = 16,
        max_bytes: int = 256 * 2**20,
        **generate_kwargs: Any,
    ) -> None:
        self.path = Path(path)
        self.model = model
        self.hooks = [hooks] if isinstance(hooks, str) else list(hooks)
        unknown = set(generate_kwargs) - set(_SETTING_KEYS)
        if unknown:
            raise TypeError(f"unsupported generation settings for a store: {sorted(unknown)}; allowed: {_SETTING_KEYS}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.max_bytes = batch_size, max_bytes
        self.widths = self._check_hooks(model, self.hooks)
        canvas_length = model.cfg.canvas_length
        generate = {"max_new_tokens": canvas_length, **generate_kwargs}
        settings = settings_of(generate)
        max_steps = settings.max_denoising_steps
        max_canvases = math.ceil(settings.max_new_tokens / canvas_length)
        self.settings = {
            "config_hash": config_hash(model),
            "weights_fingerprint": weights_fingerprint(model),
            "hooks": self.hooks,
            "widths": self.widths,
            "prompts": list(prompts),
            "seeds": [int(s) for s in seeds],
            "steps": _index_list(steps, max_steps, "steps", "denoising steps (max_denoising_steps)"),
            "positions": _index_list(positions, canvas_length, "positions", "canvas positions (canvas_length)"),
            "canvases": _index_list(canvases, max_canvases, "canvases", "canvases (max_new_tokens / canvas_length)"),
            "generate": generate,
        }
        need = self.batch_bytes()
        if need > max_bytes:
            raise ValueError(
                f"max_bytes={max_bytes} is below one batch of rows ({need} bytes for {batch_size} units at up to "
                f"{self._max_steps()} steps × {self._n_positions()} positions); raise max_bytes, lower batch_size "
                "or narrow steps/positions"
            )
        self.shards: list[dict[str, Any]] = []
        self.completed: set[tuple[int, int]] = set()
        if (self.path / MANIFEST).exists():
            self._reopen()
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            self._write_manifest()

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _check_hooks(model: HookedDiffusionGemma, hooks: list[str]) -> dict[str, int]:
        specs = hook_specs(model.cfg)
        widths = {}
        for name in hooks:
            if name not in specs:
                raise KeyError(model.unknown_hook_message(name))
            spec = specs[name]
            if spec.fires == "encoder" or spec.pos_axis != 1 or spec.dtype != "model":
                raise ValueError(
                    f"{name} is not a per-step, per-position float hook ([batch, pos, ...] at every step); "
                    "a store holds decoder hooks such as decoder.blocks.L.hook_resid_post"
                )
            widths[name] = math.prod(spec.shape[2:])
        return widths

    def _max_steps(self) -> int:
        cap = settings_of(self.settings["generate"]).max_denoising_steps
        return cap if self.settings["steps"] is None else len(self.settings["steps"])

    def _n_positions(self) -> int:
        positions = self.settings["positions"]
        return self.model.cfg.canvas_length if positions is None else len(positions)

    def _n_canvases(self) -> int:
        n = math.ceil(self.settings["generate"]["max_new_tokens"] / self.model.cfg.canvas_length)
        return n if self.settings["canvases"] is None else len(self.settings["canvases"])

    def row_bytes(self) -> int:
        """Bytes of one row: every hook's value in float32 plus the labels (int64)."""
        return 4 * sum(self.widths.values()) + 8 * len(LABEL_FIELDS)

    def batch_bytes(self) -> int:
        """The most bytes one generation batch can add to the buffer."""
        rows = self.batch_size * self._max_steps() * self._n_positions() * self._n_canvases()
        return rows * self.row_bytes()

    def _reopen(self) -> None:
        manifest = json.loads((self.path / MANIFEST).read_text())
        if manifest.get("format_version", 0) > STORE_FORMAT_VERSION:
            raise ValueError(f"{self.path} was written by a newer diffusionlens; upgrade to read it")
        differences = []
        for key, mine in self.settings.items():
            theirs = manifest["settings"].get(key)
            if theirs != mine:
                if key == "prompts":
                    differences.append(f"prompts: {len(theirs or [])} stored vs {len(mine)} given, or different text")
                else:
                    differences.append(f"{key}: stored {theirs!r}, given {mine!r}")
        if differences:
            raise StoreMismatchError(
                f"{self.path} holds a store written with other settings; differences:\n  " + "\n  ".join(differences)
            )
        # A shard written just before an interruption but missing from the manifest is ignored, and
        # its units are harvested again: the manifest is the only record of what is complete.
        self.shards = [s for s in manifest["shards"] if (self.path / s["file"]).exists()]
        self.completed = {(p, s) for shard in self.shards for p, s in shard["units"]}

    def _write_manifest(self) -> None:
        manifest = {"format_version": STORE_FORMAT_VERSION, "settings": self.settings, "shards": self.shards}
        tmp = self.path / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, self.path / MANIFEST)

    # ------------------------------------------------------------------ harvesting
    def pending_units(self) -> list[tuple[int, int]]:
        """(prompt id, seed) pairs not yet in a written shard, in harvest order."""
        return [
            (p, s)
            for p in range(len(self.settings["prompts"]))
            for s in self.settings["seeds"]
            if (p, s) not in self.completed
        ]

    def harvest(self, *, max_units: int | None = None, progress: bool = True) -> int:
        """Generate the pending units (at most `max_units`) and write their rows; returns rows written."""
        units = self.pending_units()[:max_units]
        buffer: list[dict[str, torch.Tensor]] = []
        buffered_units: list[tuple[int, int]] = []
        buffered_bytes, written = 0, 0
        bar = tqdm(total=len(units), desc="harvesting", unit="unit", disable=not progress)
        try:
            for start in range(0, len(units), self.batch_size):
                chunk = units[start : start + self.batch_size]
                rows = self._generate_rows(chunk)
                size = rows["label.prompt_id"].shape[0] * self.row_bytes()
                if buffered_bytes + size > self.max_bytes:
                    written += self._flush(buffer, buffered_units)
                    buffer, buffered_units, buffered_bytes = [], [], 0
                buffer.append(rows)
                buffered_units += chunk
                buffered_bytes += size
                bar.update(len(chunk))
            written += self._flush(buffer, buffered_units)
        finally:
            bar.close()
        return written

    def _generate_rows(self, chunk: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        model, settings = self.model, self.settings
        input_ids, attention_mask = model.to_tokens_and_mask([settings["prompts"][p] for p, _ in chunk])
        result, cache = model.generate_with_cache(
            input_ids,
            attention_mask=attention_mask,
            names_filter=self.hooks,
            steps=settings["steps"],
            positions=settings["positions"],
            canvases=settings["canvases"],
            noise=RowReplayNoise([s for _, s in chunk]),
            progress=False,
            **settings["generate"],
        )
        return unit_rows(result, cache, self.hooks, chunk, positions=settings["positions"])

    def _flush(self, buffer: list[dict[str, torch.Tensor]], units: list[tuple[int, int]]) -> int:
        if not buffer:
            return 0
        tensors = {key: torch.cat([rows[key] for rows in buffer]).contiguous() for key in buffer[0]}
        n_rows = tensors["label.prompt_id"].shape[0]
        fname = f"shard_{len(self.shards):05d}.safetensors"
        tmp = self.path / (fname + ".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, self.path / fname)  # a shard is complete or absent
        self.shards.append({"file": fname, "rows": n_rows, "units": [list(u) for u in units]})
        self.completed.update(units)
        self._write_manifest()
        return n_rows

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return sum(s["rows"] for s in self.shards)

    def __repr__(self) -> str:
        return (
            f"ActivationStore({self.path}, {len(self)} rows in {len(self.shards)} shards, hooks {self.hooks}, "
            f"{len(self.completed)}/{len(self.settings['prompts']) * len(self.settings['seeds'])} units)"
        )

    @property
    def prompts(self) -> list[str]:
        return self.settings["prompts"]

    def _read(self, shard: dict[str, Any], keys: Sequence[str]) -> dict[str, torch.Tensor]:
        with safe_open(str(self.path / shard["file"]), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in keys}

    def _label_keys(self) -> list[str]:
        return [_LABEL_PREFIX + f for f in LABEL_FIELDS]

    def labels(self) -> dict[str, Int[torch.Tensor, " rows"]]:
        """Every row's labels, in storage order (`accepted` is 0/1)."""
        parts = [self._read(s, self._label_keys()) for s in self.shards]
        return {f: torch.cat([p[_LABEL_PREFIX + f] for p in parts]) for f in LABEL_FIELDS} if parts else {}

    def activations(self, hook: str) -> Float[torch.Tensor, "rows d"]:
        """Every row's value of `hook`, in storage order (loads them all: for stores that fit in memory)."""
        self._need_hook(hook)
        parts = [self._read(s, [hook])[hook] for s in self.shards]
        return torch.cat(parts) if parts else torch.zeros(0, self.widths[hook])

    def _need_hook(self, hook: str) -> None:
        if hook not in self.widths:
            raise KeyError(f"{hook!r} is not in this store; it holds {self.hooks}")

    def batches(
        self,
        hook: str,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        epochs: int | None = 1,
        with_labels: bool = False,
    ) -> Iterator[Any]:
        """Batches of `[batch_size, d]` rows of `hook` (`epochs=None`: forever, as SAELens's trainer wants).

        Shuffling is seeded: shard order is permuted each epoch and rows are permuted within a
        window of two shards, so memory stays at about two shards whatever the store's size.
        With `with_labels`, yields `(activations, labels)`.
        """
        self._need_hook(hook)
        if not self.shards:
            raise ValueError(f"{self.path} holds no rows yet; run harvest() first")
        generator = torch.Generator().manual_seed(seed)
        keys = [hook, *self._label_keys()] if with_labels else [hook]
        epoch = 0
        while epochs is None or epoch < epochs:
            order = torch.randperm(len(self.shards), generator=generator) if shuffle else range(len(self.shards))
            carry: dict[str, torch.Tensor] | None = None
            for index in order:
                fresh = self._read(self.shards[int(index)], keys)
                pool = fresh if carry is None else {k: torch.cat([carry[k], fresh[k]]) for k in keys}
                n = pool[hook].shape[0]
                perm = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
                full = n - n % batch_size
                for start in range(0, full, batch_size):
                    idx = perm[start : start + batch_size]
                    yield self._batch(pool, idx, hook, with_labels)
                carry = {k: v[perm[full:]] for k, v in pool.items()}
            if carry is not None and carry[hook].shape[0] and epochs is not None:
                yield self._batch(carry, torch.arange(carry[hook].shape[0]), hook, with_labels)
            epoch += 1

    @staticmethod
    def _batch(pool: dict[str, torch.Tensor], idx: torch.Tensor, hook: str, with_labels: bool) -> Any:
        acts = pool[hook][idx]
        if not with_labels:
            return acts
        return acts, {k[len(_LABEL_PREFIX) :]: v[idx] for k, v in pool.items() if k.startswith(_LABEL_PREFIX)}


def unit_rows(
    result: Any,
    cache: Any,
    hooks: Sequence[str],
    units: Sequence[tuple[int, int]],
    *,
    positions: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Rows of one `generate_with_cache` run: per (batch row, canvas, recorded step ≤ the row's stop
    step, recorded position), each hook's value flattened to `[d]` and the labels."""
    trace = result.trace
    prompt_len, length = trace.prompt_length, trace[0].input_canvas.shape[-1]
    pos = torch.tensor(positions) if positions is not None else torch.arange(length)
    eos_ids = torch.tensor(trace.settings.get("eos_token_id") or [-1])
    values: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    labels: dict[str, list[torch.Tensor]] = {f: [] for f in LABEL_FIELDS}
    for canvas in cache.canvases():
        ct = trace[canvas]
        stop = ct.stop_step()
        earlier = result.sequences[:, prompt_len : prompt_len + canvas * length].cpu()
        done_before = torch.isin(earlier, eos_ids).any(-1)  # rows whose answer ended in an earlier canvas
        for step in cache.steps(canvas):
            for row, (prompt_id, seed) in enumerate(units):
                if step > int(stop[row]) or bool(done_before[row]):
                    continue
                for h in hooks:
                    values[h].append(cache.get(h, canvas=canvas, step=step)[row].reshape(len(pos), -1).float().cpu())
                n = len(pos)
                labels["prompt_id"].append(torch.full((n,), prompt_id))
                labels["seed"].append(torch.full((n,), seed))
                labels["canvas"].append(torch.full((n,), canvas))
                labels["step"].append(torch.full((n,), step))
                labels["position"].append(pos.clone())
                labels["input_token"].append(ct.input_canvas[step, row, pos])
                labels["final_token"].append(ct.final[row, pos])
                labels["accepted"].append(ct.accepted[step, row, pos].long())
    out = {h: torch.cat(v) if v else torch.zeros(0) for h, v in values.items()}
    out.update(
        {_LABEL_PREFIX + f: torch.cat(v).long() if v else torch.zeros(0, dtype=torch.long) for f, v in labels.items()}
    )
    return out
