"""DenoisingCache: hook values of a whole generation, with a step axis.

Recording is filtered by name, step, canvas position and canvas at record time, so memory grows
with the request, never with the model. Storage is the device the value was produced on
("memory"), host memory ("cpu", pinned when CUDA is present), or a directory of safetensors
shards, one per (canvas, step), written as the run goes and read lazily ("disk").
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from diffusionlens.cache import ActivationCache
from diffusionlens.hook_reference import estimate_cache_bytes, hook_specs

if TYPE_CHECKING:
    from diffusionlens.hook_points import HookPoint
    from diffusionlens.model import HookedDiffusionGemma

CACHE_FORMAT_VERSION = 1
ENCODER = -1  # the step key under which encoder values (once per canvas) are stored
Selector = int | slice | Sequence[int] | torch.Tensor | str | None


def _select_set(selector: Selector, size: int, what: str) -> set[int] | None:
    """Indices picked by an int, slice, list, bool mask, 'all' or None (None = everything)."""
    if selector is None or (isinstance(selector, str) and selector == "all"):
        return None
    if isinstance(selector, str):
        raise ValueError(f"{what} must be an int, slice, list, bool mask or 'all', got {selector!r}")
    if isinstance(selector, int):
        return {selector % size if selector < 0 else selector}
    if isinstance(selector, slice):
        return set(range(size)[selector])
    if isinstance(selector, torch.Tensor) and selector.dtype == torch.bool:
        return set(torch.nonzero(selector).flatten().tolist())
    return {int(i) % size if int(i) < 0 else int(i) for i in selector}


class CacheBudgetError(MemoryError):
    """The requested recording would exceed `max_bytes`."""


class DenoisingCache:
    """Step-indexed activations of a generation.

    `cache[name]` is `[step, batch, pos, …]` for a single-canvas run (encoder hooks: `[batch, pos, …]`);
    `cache.get(name, canvas=c, step=s)` in general; `cache.steps(c)` lists recorded steps;
    `cache.step_cache(s, canvas=c)` is an `ActivationCache` of one step, so every single-pass helper
    (accumulated_resid, logit_lens, …) works at any step.
    """

    def __init__(
        self,
        names: list[str],
        *,
        steps: Selector = None,
        positions: Selector = None,
        canvases: Selector = None,
        dtype: torch.dtype | None = None,
        storage: str = "memory",
        path: str | Path | None = None,
        max_steps: int = 48,
        max_canvases: int = 1,
        canvas_length: int = 256,
        pos_axes: dict[str, int | None] | None = None,
    ) -> None:
        if storage not in ("memory", "cpu", "disk"):
            raise ValueError(f"storage must be 'memory', 'cpu' or 'disk', got {storage!r}")
        if storage == "disk" and path is None:
            raise ValueError("storage='disk' needs path=<directory to write the shards into>")
        self.names = list(names)
        self.storage = storage
        self.dtype = dtype
        self.path = Path(path) if path is not None else None
        self._steps = _select_set(steps, max_steps, "steps")
        self._canvases = _select_set(canvases, max_canvases, "canvases")
        self._positions = _select_set(positions, canvas_length, "positions")
        self.positions = None if self._positions is None else sorted(self._positions)
        self._pos_index: torch.Tensor | None = None
        self._pos_axes = pos_axes or {}
        self._pending: dict[str, torch.Tensor] = {}
        self._data: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self._files: dict[tuple[int, int], str] = {}
        self.model: HookedDiffusionGemma | None = None
        if self.path is not None:
            self.path.mkdir(parents=True, exist_ok=True)
            self._write_meta()

    # ------------------------------------------------------------------ recording
    def wants(self, canvas: int, step: int | None) -> bool:
        if self._canvases is not None and canvas not in self._canvases:
            return False
        return step is None or self._steps is None or step in self._steps

    def recording_hooks(self, model: HookedDiffusionGemma) -> list[tuple[str, Callable]]:
        self.model = model
        return [(name, self._record) for name in self.names]

    def _record(self, tensor: torch.Tensor, hook: HookPoint) -> None:
        ctx = hook.ctx
        if not self.wants(ctx.canvas, ctx.step):
            return
        value = tensor.detach()
        axis = self._pos_axes.get(hook.name)
        if self.positions is not None and axis is not None and ctx.step is not None:
            if self._pos_index is None or self._pos_index.device != value.device:
                self._pos_index = torch.tensor(self.positions, device=value.device)
            value = value.index_select(axis, self._pos_index)
        if self.dtype is not None and value.is_floating_point():
            value = value.to(self.dtype)
        if self.storage == "cpu" or self.storage == "disk":
            value = _to_host(value)
        elif value.data_ptr() == tensor.data_ptr():
            value = value.clone()  # own the storage: a view would pin the whole activation
        self._pending[hook.name] = value

    def end_encoder(self, canvas: int) -> None:
        self._flush(canvas, ENCODER)

    def end_step(self, canvas: int, step: int) -> None:
        self._flush(canvas, step)

    def _flush(self, canvas: int, step: int) -> None:
        if not self._pending:
            return
        values, self._pending = self._pending, {}
        if self.storage == "disk":
            fname = f"canvas{canvas:04d}_{'encoder' if step == ENCODER else f'step{step:04d}'}.safetensors"
            tmp = self.path / (fname + ".tmp")
            save_file({k: v.contiguous() for k, v in values.items()}, str(tmp))
            os.replace(tmp, self.path / fname)  # a shard is either complete or absent
            self._files[(canvas, step)] = fname
            self._write_meta()
        else:
            self._data[(canvas, step)] = values

    def finish(self) -> None:
        self._pending = {}
        if self.path is not None:
            self._write_meta()

    def _write_meta(self) -> None:
        meta = {
            "format_version": CACHE_FORMAT_VERSION,
            "names": self.names,
            "positions": self.positions,
            "shards": [[c, s, f] for (c, s), f in sorted(self._files.items())],
        }
        tmp = self.path / "cache.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, self.path / "cache.json")

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | Path) -> DenoisingCache:
        """Reopen a disk cache; tensors are read lazily. Completed steps of an interrupted run load."""
        path = Path(path)
        meta_path = path / "cache.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{path} holds no cache.json; is it a DenoisingCache directory?")
        meta = json.loads(meta_path.read_text())
        version = meta.get("format_version", 0)
        if version > CACHE_FORMAT_VERSION:
            raise ValueError(
                f"{path} was written by a newer diffusionlens (cache format {version} > {CACHE_FORMAT_VERSION}); "
                "upgrade diffusionlens to read it"
            )
        cache = cls.__new__(cls)
        cache.names, cache.storage, cache.dtype, cache.path = meta["names"], "disk", None, path
        cache.positions = meta.get("positions")
        cache._data, cache._pending, cache.model = {}, {}, None
        cache._files = {}
        for canvas, step, fname in meta["shards"]:
            if not re.fullmatch(r"canvas\d{4}_(encoder|step\d{4})\.safetensors", fname):
                raise ValueError(f"{meta_path} names an unexpected shard file {fname!r}; refusing to open it")
            if (path / fname).exists():
                cache._files[(canvas, step)] = fname
        return cache

    # ------------------------------------------------------------------ reading
    def _keys(self) -> list[tuple[int, int]]:
        return sorted(set(self._data) | set(self._files))

    def canvases(self) -> list[int]:
        return sorted({c for c, _ in self._keys()})

    def steps(self, canvas: int = 0) -> list[int]:
        """Recorded denoising steps of `canvas`, in order."""
        return [s for c, s in self._keys() if c == canvas and s != ENCODER]

    def _load(self, canvas: int, step: int, name: str) -> torch.Tensor:
        if (canvas, step) in self._data:
            values = self._data[(canvas, step)]
            if name not in values:
                raise KeyError(self._missing(name))
            return values[name]
        fname = self._files.get((canvas, step))
        if fname is None:
            where = "encoder" if step == ENCODER else f"step {step}"
            raise KeyError(f"nothing recorded for canvas {canvas}, {where}; recorded steps: {self.steps(canvas)}")
        with safe_open(str(self.path / fname), framework="pt") as handle:
            if name not in handle.keys():
                raise KeyError(self._missing(name))
            return handle.get_tensor(name)

    def _missing(self, name: str) -> str:
        import difflib

        near = difflib.get_close_matches(name, self.names, n=5, cutoff=0.5)
        return f"'{name}' was not recorded." + (f" Nearest recorded names: {', '.join(near)}." if near else "")

    def _is_encoder(self, name: str) -> bool:
        return name.startswith("encoder.")

    def get(self, name: str, canvas: int = 0, step: int | None = None) -> torch.Tensor:
        """One value: encoder hooks by canvas; decoder/sampler hooks by canvas and step (all steps
        stacked on a new leading axis when `step` is None)."""
        if self._is_encoder(name):
            return self._load(canvas, ENCODER, name)
        if step is not None:
            return self._load(canvas, step, name)
        steps = self.steps(canvas)
        if not steps:
            raise KeyError(f"no steps recorded for canvas {canvas}")
        return torch.stack([self._load(canvas, s, name) for s in steps])

    def __getitem__(self, name: str) -> torch.Tensor:
        canvases = self.canvases()
        if len(canvases) > 1:
            raise KeyError(f"this cache spans canvases {canvases}; use cache.get('{name}', canvas=c, step=s)")
        return self.get(name, canvas=canvases[0] if canvases else 0)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def step_cache(self, step: int, canvas: int = 0) -> ActivationCache:
        """An ActivationCache of one step: decoder/sampler values at `step` plus the canvas's encoder values."""
        store = {}
        for name in self.names:
            key = (canvas, ENCODER if self._is_encoder(name) else step)
            if key in self._data or key in self._files:
                try:
                    store[name] = self._load(*key, name)
                except KeyError:
                    continue
        return ActivationCache(store, self.model)

    def logit_lens(self, step: int, canvas: int = 0) -> torch.Tensor:
        """Logit lens of every decoder layer at one step: `[layers + 1, batch, pos, vocab]`."""
        return self.step_cache(step, canvas).logit_lens("decoder")

    def nbytes(self) -> int:
        """Bytes held in memory by recorded tensors (disk caches hold none)."""
        seen, total = set(), 0
        for values in self._data.values():
            for t in values.values():
                storage = t.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        return total

    def __repr__(self) -> str:
        return (
            f"DenoisingCache({len(self.names)} names, canvases {self.canvases()}, storage={self.storage!r}, "
            f"{self.nbytes() / 2**20:.2f} MiB in memory)"
        )


def _to_host(value: torch.Tensor) -> torch.Tensor:
    if value.device.type == "cpu":
        return value.clone()
    host = torch.empty(value.shape, dtype=value.dtype, pin_memory=torch.cuda.is_available())
    return host.copy_(value, non_blocking=False)


def build_cache(
    model: HookedDiffusionGemma,
    *,
    names_filter: Any = None,
    steps: Selector = None,
    positions: Selector = None,
    canvases: Selector = None,
    dtype: torch.dtype | None = None,
    storage: str = "memory",
    path: str | Path | None = None,
    max_bytes: int | None = None,
    batch: int = 1,
    prompt_len: int = 1,
    max_steps: int = 48,
    n_canvases: int = 1,
) -> DenoisingCache:
    """Resolve the filters against the model and, with `max_bytes`, refuse up front if the
    request would not fit (the estimate counts every allowed step)."""
    if names_filter is None:
        names = list(model.hook_dict)
    elif callable(names_filter) or isinstance(names_filter, (str, Iterable)):
        names = model.resolve_hook_names(names_filter)
    else:
        raise TypeError(f"names_filter must be a name, glob, list or predicate, got {type(names_filter)}")
    specs = hook_specs(model.cfg, batch, prompt_len)
    cache = DenoisingCache(
        names,
        steps=steps,
        positions=positions,
        canvases=canvases,
        dtype=dtype,
        storage=storage,
        path=path,
        max_steps=max_steps,
        max_canvases=n_canvases,
        canvas_length=model.cfg.canvas_length,
        pos_axes={n: specs[n].pos_axis for n in names},
    )
    if max_bytes is not None:
        n_steps = max_steps if cache._steps is None else len(cache._steps)
        n_can = n_canvases if cache._canvases is None else len(cache._canvases & set(range(n_canvases)))
        estimate = estimate_cache_bytes(
            model.cfg,
            names,
            batch=batch,
            prompt_len=prompt_len,
            steps=n_steps,
            canvases=n_can,
            positions=None if cache.positions is None else len(cache.positions),
            dtype=dtype or model.dtype,
        )
        if estimate > max_bytes:
            raise CacheBudgetError(
                f"recording {len(names)} hooks over {n_steps} steps × {n_can} canvases needs about "
                f"{estimate / 2**20:.1f} MiB > max_bytes={max_bytes / 2**20:.1f} MiB; narrow names_filter, steps "
                "or positions, or pick a smaller dtype"
            )
    return cache
