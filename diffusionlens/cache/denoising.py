"""DenoisingCache: hook values of a whole generation, with a step axis.

Recording is filtered by name, step, canvas position and canvas at record time, so memory grows
with the request, never with the model. What to record is a `RecordSpec`; where the values go is a
`CacheStorage` (diffusionlens.cache.storage: memory, cpu or a directory of safetensors shards).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, no_type_check

import torch

from diffusionlens.cache.activation import ActivationCache
from diffusionlens.cache.selectors import Selector, check_selector, select_indices
from diffusionlens.cache.storage import (
    CACHE_FORMAT_VERSION,
    ENCODER,
    STORAGE_KINDS,
    CacheIntegrityError,
    CacheStorage,
    DiskStorage,
    MemoryStorage,
    decode_dtype,
    describe_steps,
    encode_dtype,
    make_storage,
)
from diffusionlens.hooks.name_filters import NameFilter
from diffusionlens.hooks.names import resolve_act_key
from diffusionlens.hooks.shapes import estimate_cache_bytes, hook_specs

if TYPE_CHECKING:
    from diffusionlens.hooks.points import HookPoint
    from diffusionlens.model import HookedDiffusionGemma

__all__ = ["CACHE_FORMAT_VERSION", "ENCODER", "CacheBudgetError", "CacheIntegrityError", "DenoisingCache", "RecordSpec"]


class CacheBudgetError(MemoryError):
    """The requested recording would exceed `max_bytes`."""


# Validated in __post_init__ with messages that name the fix; no_type_check keeps a runtime type
# checker (the tests run one) from pre-empting them with a bare type error.
@no_type_check
@dataclass(frozen=True)
class RecordSpec:
    """What `generate_with_cache` records, and where: validated on construction.

    names_filter: hook names, globs or regexes (or a list of them) or a predicate; None = every hook.
    steps / positions / canvases: an int, slice, list, bool mask or "all" (None = all).
    dtype: cast floating values (None keeps the model's). storage: "memory", "cpu" or "disk";
    path: the directory for "disk" (new or empty); overwrite: let "disk" replace a cache already in
    `path`. max_bytes: refuse before the run if the estimate is larger.
    """

    names_filter: NameFilter = None
    steps: Selector = None
    positions: Selector = None
    canvases: Selector = None
    dtype: torch.dtype | None = None
    storage: str = "memory"
    path: str | Path | None = None
    overwrite: bool = False
    max_bytes: int | None = None

    def __post_init__(self) -> None:
        for what in ("steps", "positions", "canvases"):
            check_selector(getattr(self, what), what)
        if self.dtype is not None and not isinstance(self.dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype such as torch.float16, got {self.dtype!r}")
        if self.storage not in STORAGE_KINDS:
            raise ValueError(f"storage must be 'memory', 'cpu' or 'disk', got {self.storage!r}")
        if self.storage == "disk" and self.path is None:
            raise ValueError("storage='disk' needs path=<directory to write the shards into>")
        if self.storage != "disk" and self.path is not None:
            raise ValueError(
                f"path= is where storage='disk' writes; drop it or pass storage='disk' (got {self.storage!r})"
            )
        if not isinstance(self.overwrite, bool):
            raise TypeError(f"overwrite must be True or False, got {self.overwrite!r}")
        if self.overwrite and self.storage != "disk":
            raise ValueError(f"overwrite= applies to storage='disk'; drop it (got storage={self.storage!r})")
        if self.max_bytes is not None and (not isinstance(self.max_bytes, int) or self.max_bytes <= 0):
            raise ValueError(f"max_bytes must be a positive int (bytes), got {self.max_bytes!r}")

    def cache_selection(self) -> dict[str, Any]:
        """The fields `DenoisingCache` takes as they are, by its argument names: what to keep (steps,
        positions, canvases, dtype) and where (storage, path, overwrite). The names filter is resolved
        against a model first, and max_bytes is checked before the run."""
        where = ("storage", "path", "overwrite")
        return {name: getattr(self, name) for name in ("steps", "positions", "canvases", "dtype", *where)}

    @classmethod
    def merged(cls, spec: RecordSpec | None, **overrides: Any) -> RecordSpec:
        """`spec` (default `RecordSpec()`) with every override that is not None applied."""
        if spec is not None and not isinstance(spec, RecordSpec):
            raise TypeError(f"record must be a RecordSpec, got {type(spec).__name__}")
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"RecordSpec has no field(s) {sorted(unknown)}")
        given = {k: v for k, v in overrides.items() if v is not None}
        spec = spec or cls()
        if "storage" in given and given["storage"] != "disk":
            # a storage override that is not disk drops the spec's directory and its permission to overwrite it
            given.setdefault("path", None)
            given.setdefault("overwrite", False)
        return replace(spec, **given)


class DenoisingCache:
    """Step-indexed activations of a generation.

    `cache[name]` is `[step, batch, pos, …]` for a single-canvas run (encoder hooks: `[batch, pos, …]`);
    `cache.get(name, canvas=c, step=s)` in general; `cache.steps(c)` lists recorded steps;
    `cache.step_cache(s, canvas=c)` is an `ActivationCache` of one step, so every single-pass helper
    (accumulated_resid, logit_lens, …) works at any step. `storage` is a kind ("memory", "cpu",
    "disk" with `path`) or a `CacheStorage`; `cache.backend` is the storage in use.

    `max_steps`, `max_canvases` and `canvas_length` are the most the run can reach, which the `steps`,
    `canvases` and `positions` selectors are checked against. `generate_with_cache` passes the run's
    settings; a cache built by hand without `max_steps` does not know the step count, so it refuses a
    step selector that counts back from the end (`steps=-1`) rather than guess one.
    """

    def __init__(
        self,
        names: list[str],
        *,
        steps: Selector = None,
        positions: Selector = None,
        canvases: Selector = None,
        dtype: torch.dtype | None = None,
        storage: str | CacheStorage = "memory",
        path: str | Path | None = None,
        overwrite: bool = False,
        max_steps: int | None = None,
        max_canvases: int = 1,
        canvas_length: int = 256,
        pos_axes: dict[str, int | None] | None = None,
    ) -> None:
        # Checked against the most the run can reach, before a storage directory is made.
        try:
            self._steps = select_indices(steps, max_steps, "steps", "denoising steps (max_denoising_steps)")
        except ValueError as error:
            if max_steps is not None:
                raise
            fix = "or give the cache the run's step count (max_steps=max_denoising_steps)"
            raise ValueError(f"{error}, {fix}") from None
        self._canvases = select_indices(canvases, max_canvases, "canvases", "canvases (max_new_tokens / canvas_length)")
        self._positions = select_indices(positions, canvas_length, "positions", "canvas positions (canvas_length)")
        self.backend = make_storage(storage, path, overwrite) if isinstance(storage, str) else storage
        self.storage = self.backend.kind
        self.path = getattr(self.backend, "path", None)
        self.names = list(names)
        self.dtype = dtype
        self.positions = None if self._positions is None else sorted(self._positions)
        self._sizes = {"max_steps": max_steps, "max_canvases": max_canvases, "canvas_length": canvas_length}
        self._pos_index: torch.Tensor | None = None
        self._pos_axes = pos_axes or {}
        self._pending: dict[str, torch.Tensor] = {}
        self.model: HookedDiffusionGemma | None = None
        #: whether the generation that filled this cache ran to its end (False while it runs, and for a
        #: disk cache reopened with allow_partial=True from a run that was interrupted)
        self.complete = False
        self.backend.begin(self.record())

    def record(self) -> dict[str, Any]:
        """The resolved record spec as JSON-able data: what a disk cache saves and reopens with."""

        def listed(chosen: set[int] | None) -> list[int] | None:
            return None if chosen is None else sorted(chosen)

        return {
            "names": self.names,
            "steps": listed(self._steps),
            "positions": self.positions,
            "canvases": listed(self._canvases),
            "dtype": encode_dtype(self.dtype),
            "pos_axes": self._pos_axes,
            **self._sizes,
        }

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
        self._pending[hook.name] = self.backend.prepare(value, tensor)

    def end_encoder(self, canvas: int) -> None:
        self._flush(canvas, ENCODER)

    def end_step(self, canvas: int, step: int) -> None:
        self._flush(canvas, step)

    def _flush(self, canvas: int, step: int) -> None:
        if not self._pending:
            return
        values, self._pending = self._pending, {}
        self.backend.put(canvas, step, values)

    def finish(self, complete: bool = True) -> None:
        """End the recording: `complete` when the generation ran to its end (a disk cache then writes its
        completion marker), False when it raised."""
        self._pending = {}
        self.backend.finish(complete)
        self.complete = complete

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls, path: str | Path, model: HookedDiffusionGemma | None = None, *, allow_partial: bool = False
    ) -> DenoisingCache:
        """Reopen a disk cache (read-only; tensors are read lazily) with the filters it was recorded
        with, built through the same constructor. Pass `model` for helpers that need it
        (`step_cache(...).logit_lens`).

        Every shard is first checked against the cache's manifest (names, shapes, dtypes, canvas and
        step, size): an altered cache raises `CacheIntegrityError`. So does a cache whose run was
        interrupted, unless `allow_partial=True`: then the steps that finished load, a warning lists
        them, and `cache.complete` is False."""
        if not isinstance(allow_partial, bool):
            raise TypeError(f"allow_partial must be True or False, got {allow_partial!r}")
        storage, record = DiskStorage.open(path, allow_partial=allow_partial)
        cache = cls(
            record["names"],
            steps=record["steps"],
            positions=record["positions"],
            canvases=record["canvases"],
            dtype=decode_dtype(record["dtype"]),
            storage=storage,
            max_steps=record["max_steps"],
            max_canvases=record["max_canvases"],
            canvas_length=record["canvas_length"],
            pos_axes=record["pos_axes"],
        )
        cache.model = model
        cache.complete = storage.complete
        if not storage.complete:
            warnings.warn(
                f"{path} is an unfinished cache (its run stopped before the end); read what finished: "
                f"{describe_steps([{'canvas': c, 'step': s} for c, s in sorted(storage.keys())])}",
                UserWarning,
                stacklevel=2,
            )
        return cache

    # ------------------------------------------------------------------ reading
    def _keys(self) -> list[tuple[int, int]]:
        return sorted(self.backend.keys())

    def canvases(self) -> list[int]:
        return sorted({c for c, _ in self._keys()})

    def ended_before(self, canvas: int) -> bool:
        """Whether the recorded run finished before reaching `canvas`: the record spec selects it, yet
        nothing was recorded for it or any later canvas (canvases run in order)."""
        if self._canvases is not None and canvas not in self._canvases:
            return False
        recorded = self.canvases()
        return bool(recorded) and all(c < canvas for c in recorded)

    def steps(self, canvas: int = 0) -> list[int]:
        """Recorded denoising steps of `canvas`, in order."""
        return [s for c, s in self._keys() if c == canvas and s != ENCODER]

    def _load(self, canvas: int, step: int, name: str) -> torch.Tensor:
        if (canvas, step) not in self.backend.keys():
            where = "encoder" if step == ENCODER else f"step {step}"
            raise KeyError(f"nothing recorded for canvas {canvas}, {where}; recorded steps: {self.steps(canvas)}")
        value = self.backend.read(canvas, step, name)
        if value is None:
            raise KeyError(self._missing(name))
        return value

    def _missing(self, name: str) -> str:
        import difflib

        near = difflib.get_close_matches(name, self.names, n=5, cutoff=0.5)
        return f"'{name}' was not recorded." + (f" Nearest recorded names: {', '.join(near)}." if near else "")

    def _is_encoder(self, name: str) -> bool:
        return name.startswith("encoder.")

    def _resolve(self, key: str | tuple) -> str:
        """A full hook name for `key`: a name, a TransformerLens short name or a tuple
        (name, layer[, layer_type][, stack]) as in `ActivationCache`."""
        return resolve_act_key(key, self.model, self.names)

    def get(self, name: str | tuple, canvas: int = 0, step: int | None = None) -> torch.Tensor:
        """One value: encoder hooks by canvas; decoder/sampler hooks by canvas and step (all steps
        stacked on a new leading axis when `step` is None). Unlike dict.get, a missing value raises."""
        name = self._resolve(name)
        if self._is_encoder(name):
            return self._load(canvas, ENCODER, name)
        if step is not None:
            return self._load(canvas, step, name)
        steps = self.steps(canvas)
        if not steps:
            raise KeyError(f"no steps recorded for canvas {canvas}")
        missing = [s for s in steps if name in self.names and name not in self.backend.names(canvas, s)]
        if missing and len(missing) < len(steps):
            raise KeyError(
                f"'{name}' did not fire at recorded steps {missing} of canvas {canvas} (e.g. "
                "decoder.self_cond.hook_logits_in at step 0), so there is no step axis to stack it on; "
                f"read one step with cache.get('{name}', step=s)"
            )
        return torch.stack([self._load(canvas, s, name) for s in steps])

    def __getitem__(self, name: str | tuple) -> torch.Tensor:
        canvases = self.canvases()
        if len(canvases) > 1:
            raise KeyError(f"this cache spans canvases {canvases}; use cache.get({name!r}, canvas=c, step=s)")
        return self.get(name, canvas=canvases[0] if canvases else 0)

    def __contains__(self, key: object) -> bool:
        try:
            return self._resolve(key) in self.keys()  # type: ignore[arg-type]
        except (KeyError, ValueError, TypeError):
            return False

    def recorded_anywhere(self, name: str) -> bool:
        """Whether `name` was recorded at any canvas and step; unlike `name in cache` (the names
        `cache[name]` reads at every step) this is true of `decoder.self_cond.hook_logits_in`, which
        does not fire at step 0."""
        return any(name in self.backend.names(c, s) for c, s in self._keys())

    # ------------------------------------------------------------------ mapping protocol
    def keys(self) -> list[str]:
        """Names `cache[name]` reads: recorded for every canvas, and (decoder/sampler hooks) at every
        recorded step. A hook that fired at only some steps (decoder.self_cond.hook_logits_in does not
        fire at step 0) is read per step with `get(name, step=s)`."""
        stored = self._keys()
        if not stored:
            return []
        present = [self.backend.names(c, s) for c, s in stored]
        encoder = [names for (_, s), names in zip(stored, present, strict=True) if s == ENCODER]
        steps = [names for (_, s), names in zip(stored, present, strict=True) if s != ENCODER]
        keep = []
        for name in self.names:
            shards = encoder if self._is_encoder(name) else steps
            if shards and all(name in names for names in shards):
                keep.append(name)
        return keep

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def values(self) -> Iterator[torch.Tensor]:
        """`cache[name]` for every name in `keys()`, read lazily (a disk cache reads one at a time)."""
        return (self[name] for name in self.keys())

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, `cache[name]`) for every name in `keys()`, read lazily."""
        return ((name, self[name]) for name in self.keys())

    def to(self, device: torch.device | str) -> DenoisingCache:
        """Move every recorded value to `device` in place and return the cache (as TransformerLens).
        A disk cache reads from its shards: load it with `step_cache(s).to(device)` instead."""
        if not isinstance(self.backend, MemoryStorage):
            raise ValueError(
                f"a {self.storage!r} cache reads its shards on demand; move what you read: "
                "cache.step_cache(s).to(device) or cache[name].to(device)"
            )
        self.backend._data = {
            key: {k: v.to(device) for k, v in vals.items()} for key, vals in self.backend._data.items()
        }
        return self

    def remove_batch_dim(self) -> DenoisingCache:
        """Not on the step axis: take one step's ActivationCache, `cache.step_cache(s).remove_batch_dim()`."""
        raise TypeError(
            "DenoisingCache values lead with the step axis; use cache.step_cache(s).remove_batch_dim() "
            "or cache[name][:, 0] for one batch row"
        )

    def __reduce_ex__(self, protocol: int) -> Any:
        # A disk cache pickles as a reference to its directory: unpickling reopens it read-only with
        # DenoisingCache.load, so no tensors are copied into the pickle (and none are lost).
        if isinstance(self.backend, DiskStorage):
            return (_reopen, (str(self.path), self.model, not self.complete))
        return super().__reduce_ex__(protocol)

    def step_cache(self, step: int, canvas: int = 0) -> ActivationCache:
        """An ActivationCache of one step: decoder/sampler values at `step` plus the canvas's encoder values.
        A step that was not recorded raises a KeyError listing the recorded steps."""
        stored = self.backend.keys()
        if (canvas, step) not in stored:
            if canvas not in self.canvases():
                raise KeyError(f"canvas {canvas} was not recorded; recorded canvases: {self.canvases()}")
            raise KeyError(
                f"step {step} of canvas {canvas} was not recorded; recorded steps: {self.steps(canvas)} "
                "(record more with steps=... in generate_with_cache)"
            )
        store = {}
        for name in self.names:
            key = (canvas, ENCODER if self._is_encoder(name) else step)
            if key in stored:
                try:
                    store[name] = self._load(*key, name)
                except KeyError:
                    continue
        return ActivationCache(store, self.model)

    def logit_lens(self, step: int, canvas: int = 0) -> torch.Tensor:
        """Logit lens of every decoder layer at one step: `[layers + 1, batch, pos, vocab]`."""
        return self.step_cache(step, canvas).logit_lens(stack="decoder")

    def nbytes(self) -> int:
        """Bytes held in memory by recorded tensors (disk caches hold none)."""
        return self.backend.nbytes()

    def __repr__(self) -> str:
        return (
            f"DenoisingCache({len(self.names)} names, canvases {self.canvases()}, storage={self.storage!r}, "
            f"{self.nbytes() / 2**20:.2f} MiB in memory)"
        )


def _reopen(path: str, model: HookedDiffusionGemma | None, allow_partial: bool) -> DenoisingCache:
    return DenoisingCache.load(path, model, allow_partial=allow_partial)


def build_cache(
    model: HookedDiffusionGemma,
    record: RecordSpec | None = None,
    *,
    batch: int = 1,
    prompt_len: int = 1,
    max_steps: int,
    n_canvases: int = 1,
) -> DenoisingCache:
    """The cache `record` asks for, its names filter resolved against the model (a filter that
    matches nothing raises a KeyError naming the nearest hooks). With `record.max_bytes`, refuse up
    front if the request would not fit (the estimate counts every allowed step)."""
    record = record or RecordSpec()
    names = model.resolve_hook_names(record.names_filter)
    specs = hook_specs(model.cfg, batch, prompt_len)
    cache = DenoisingCache(
        names,
        **record.cache_selection(),
        max_steps=max_steps,
        max_canvases=n_canvases,
        canvas_length=model.cfg.canvas_length,
        pos_axes={n: specs[n].pos_axis for n in names},
    )
    if record.max_bytes is not None:
        _check_budget(model, cache, record, batch=batch, prompt_len=prompt_len, n_canvases=n_canvases)
    return cache


def _check_budget(
    model: HookedDiffusionGemma,
    cache: DenoisingCache,
    record: RecordSpec,
    *,
    batch: int,
    prompt_len: int,
    n_canvases: int,
) -> None:
    n_steps = cache._sizes["max_steps"] if cache._steps is None else len(cache._steps)
    n_can = n_canvases if cache._canvases is None else len(cache._canvases & set(range(n_canvases)))
    estimate = estimate_cache_bytes(
        model.cfg,
        cache.names,
        batch=batch,
        prompt_len=prompt_len,
        steps=n_steps,
        canvases=n_can,
        positions=None if cache.positions is None else len(cache.positions),
        dtype=record.dtype or model.dtype,
    )
    if estimate > record.max_bytes:
        raise CacheBudgetError(
            f"recording {len(cache.names)} hooks over {n_steps} steps × {n_can} canvases needs about "
            f"{estimate / 2**20:.1f} MiB > max_bytes={record.max_bytes / 2**20:.1f} MiB; narrow names_filter, steps "
            "or positions, or pick a smaller dtype"
        )
