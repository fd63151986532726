"""Where a DenoisingCache keeps its values, and the on-disk format, in one place.

A `CacheStorage` receives every (canvas, step)'s values once, when the step ends, and hands single
tensors back. `MemoryStorage` keeps them where they were computed, `CpuStorage` in host memory
(pinned when CUDA is present, so copies back to the GPU are fast), `DiskStorage` in a directory of
safetensors shards (never pickle), one per (canvas, step), written as the run goes and read lazily.

The directory format: `cache.json` (format version, the record spec the cache was built with, and
the shard list) plus `canvasCCCC_stepSSSS.safetensors` / `canvasCCCC_encoder.safetensors` shards.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

CACHE_FORMAT_VERSION = 2  # 2: cache.json carries the record spec, so a reopened cache keeps its filters
ENCODER = -1  # the step key under which encoder values (once per canvas) are stored
META_FILE = "cache.json"
_SHARD_PATTERN = re.compile(r"canvas\d{4}_(encoder|step\d{4})\.safetensors")
STORAGE_KINDS = ("memory", "cpu", "disk")


@runtime_checkable
class CacheStorage(Protocol):
    """The storage a DenoisingCache writes to and reads from."""

    kind: str

    def prepare(self, value: torch.Tensor, produced: torch.Tensor) -> torch.Tensor:
        """`value` (a detached, filtered view of the hook's `produced` tensor) as this storage keeps it."""
        ...

    def put(self, canvas: int, step: int, values: dict[str, torch.Tensor]) -> None:
        """Keep one step's values (step `ENCODER` for the canvas's encoder values)."""
        ...

    def keys(self) -> set[tuple[int, int]]:
        """Every (canvas, step) stored."""
        ...

    def read(self, canvas: int, step: int, name: str) -> torch.Tensor | None:
        """One stored tensor; None when that step was stored without `name`."""
        ...

    def names(self, canvas: int, step: int) -> set[str]:
        """The hook names stored for (canvas, step)."""
        ...

    def nbytes(self) -> int:
        """Bytes held in memory."""
        ...

    def begin(self, record: dict[str, Any]) -> None:
        """Called once by the cache, with the record spec it resolved (what disk metadata saves)."""
        ...

    def finish(self) -> None:
        """Called when the generation ends, also when it raised."""
        ...


class MemoryStorage:
    """Values stay on the device that produced them."""

    kind = "memory"

    def __init__(self) -> None:
        self._data: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

    def prepare(self, value: torch.Tensor, produced: torch.Tensor) -> torch.Tensor:
        if value.data_ptr() == produced.data_ptr():
            return value.clone()  # own the storage: a view would pin the whole activation
        return value

    def put(self, canvas: int, step: int, values: dict[str, torch.Tensor]) -> None:
        self._data[(canvas, step)] = values

    def keys(self) -> set[tuple[int, int]]:
        return set(self._data)

    def read(self, canvas: int, step: int, name: str) -> torch.Tensor | None:
        return self._data[(canvas, step)].get(name)

    def names(self, canvas: int, step: int) -> set[str]:
        return set(self._data[(canvas, step)])

    def nbytes(self) -> int:
        seen, total = set(), 0
        for values in self._data.values():
            for tensor in values.values():
                storage = tensor.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        return total

    def begin(self, record: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


class CpuStorage(MemoryStorage):
    """Values copied to host memory as they are recorded."""

    kind = "cpu"

    def prepare(self, value: torch.Tensor, produced: torch.Tensor) -> torch.Tensor:
        return to_host(value)


class DiskStorage:
    """A directory of safetensors shards, one per (canvas, step), plus `cache.json`.

    Each shard is written to a temporary name and renamed, and `cache.json` rewritten after it, so
    an interrupted run leaves complete shards that reopen. A storage opened with `DiskStorage.open`
    is read-only.
    """

    kind = "disk"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.read_only = False
        self._files: dict[tuple[int, int], str] = {}
        self._record: dict[str, Any] = {}

    @classmethod
    def open(cls, path: str | Path) -> tuple[DiskStorage, dict[str, Any]]:
        """The storage of a cache directory (read-only) and the record spec it was written with."""
        storage = cls(path)
        meta = read_metadata(storage.path)
        storage.read_only, storage._record = True, meta["record"]
        for canvas, step, fname in meta["shards"]:
            if (storage.path / fname).exists():  # an interrupted write leaves no shard behind
                storage._files[(int(canvas), int(step))] = fname
        return storage, meta["record"]

    def prepare(self, value: torch.Tensor, produced: torch.Tensor) -> torch.Tensor:
        return to_host(value)

    def put(self, canvas: int, step: int, values: dict[str, torch.Tensor]) -> None:
        if self.read_only:
            raise RuntimeError(f"{self.path} was reopened read-only; record into a new directory")
        fname = shard_name(canvas, step)
        tmp = self.path / (fname + ".tmp")
        save_file({k: v.contiguous() for k, v in values.items()}, str(tmp))
        os.replace(tmp, self.path / fname)  # a shard is either complete or absent
        self._files[(canvas, step)] = fname
        self._write()

    def keys(self) -> set[tuple[int, int]]:
        return set(self._files)

    def read(self, canvas: int, step: int, name: str) -> torch.Tensor | None:
        with safe_open(str(self.path / self._files[(canvas, step)]), framework="pt") as handle:
            return handle.get_tensor(name) if name in handle.keys() else None

    def names(self, canvas: int, step: int) -> set[str]:
        with safe_open(str(self.path / self._files[(canvas, step)]), framework="pt") as handle:
            return set(handle.keys())  # reads the shard's header only

    def nbytes(self) -> int:
        return 0

    def begin(self, record: dict[str, Any]) -> None:
        if self.read_only:
            return
        self._record = record
        self.path.mkdir(parents=True, exist_ok=True)
        self._write()

    def finish(self) -> None:
        if not self.read_only:
            self._write()

    def _write(self) -> None:
        write_metadata(self.path, self._record, self._files)


def make_storage(kind: str, path: str | Path | None) -> CacheStorage:
    """The storage named by `kind` ("memory", "cpu" or "disk"; disk needs `path`)."""
    if kind not in STORAGE_KINDS:
        raise ValueError(f"storage must be 'memory', 'cpu' or 'disk', got {kind!r}")
    if kind == "disk":
        if path is None:
            raise ValueError("storage='disk' needs path=<directory to write the shards into>")
        return DiskStorage(path)
    if path is not None:
        raise ValueError(f"path= is where storage='disk' writes; drop it or pass storage='disk' (got {kind!r})")
    return CpuStorage() if kind == "cpu" else MemoryStorage()


def to_host(value: torch.Tensor) -> torch.Tensor:
    """A host-memory copy that owns its storage (pinned when CUDA is present)."""
    if value.device.type == "cpu":
        return value.clone()
    host = torch.empty(value.shape, dtype=value.dtype, pin_memory=torch.cuda.is_available())
    return host.copy_(value, non_blocking=False)


# ---------------------------------------------------------------------- the file format
def shard_name(canvas: int, step: int) -> str:
    return f"canvas{canvas:04d}_{'encoder' if step == ENCODER else f'step{step:04d}'}.safetensors"


def write_metadata(path: Path, record: dict[str, Any], files: dict[tuple[int, int], str]) -> None:
    meta = {
        "format_version": CACHE_FORMAT_VERSION,
        "record": record,
        "shards": [[c, s, f] for (c, s), f in sorted(files.items())],
    }
    tmp = path / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, path / META_FILE)


def read_metadata(path: Path) -> dict[str, Any]:
    """`cache.json` of a cache directory, checked: its format version is this one and every shard
    name is one this format writes (a crafted name could point outside the directory)."""
    meta_path = path / META_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"{path} holds no {META_FILE}; is it a DenoisingCache directory?")
    meta = json.loads(meta_path.read_text())
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or version > CACHE_FORMAT_VERSION:
        raise ValueError(
            f"{path} was written by a newer diffusionlens (cache format {version!r} > {CACHE_FORMAT_VERSION}); "
            "upgrade diffusionlens to read it"
        )
    if version != CACHE_FORMAT_VERSION:
        raise ValueError(
            f"{path} uses cache format {version}, which this diffusionlens (format {CACHE_FORMAT_VERSION}) does not "
            "read: it lacks the record spec a reopened cache needs; record the run again"
        )
    for _, _, fname in meta["shards"]:
        if not _SHARD_PATTERN.fullmatch(fname):
            raise ValueError(f"{meta_path} names an unexpected shard file {fname!r}; refusing to open it")
    return meta


def encode_dtype(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def decode_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{META_FILE} names an unknown dtype {name!r}")
    return dtype
