"""Where a DenoisingCache keeps its values, and the on-disk format, in one place.

A `CacheStorage` receives every (canvas, step)'s values once, when the step ends, and hands single
tensors back. `MemoryStorage` keeps them where they were computed, `CpuStorage` in host memory
(pinned when CUDA is present, so copies back to the GPU are fast), `DiskStorage` in a directory of
safetensors shards (never pickle), one per (canvas, step), written as the run goes and read lazily.

The directory format: `cache.json` (format version and the record spec the cache was built with),
`canvasCCCC_stepSSSS.safetensors` / `canvasCCCC_encoder.safetensors` shards (each naming its canvas
and step in its safetensors metadata), `manifest.jsonl` (one line per shard as it is written: file,
size, canvas, step, and every tensor's name, dtype and shape) and `complete.json`, the completion
marker written last (shard count and digests of cache.json and the manifest). `DiskStorage.open`
checks all of it against the shards' headers; see `verify_cache`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# 2: cache.json carries the record spec, so a reopened cache keeps its filters; 3: a manifest of every
# shard's tensors and a completion marker, checked when the cache is reopened
CACHE_FORMAT_VERSION = 3
ENCODER = -1  # the step key under which encoder values (once per canvas) are stored
META_FILE = "cache.json"
MANIFEST_FILE = "manifest.jsonl"
COMPLETE_FILE = "complete.json"
# safetensors' dtype codes, by the torch name the manifest records
_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}
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

    def finish(self, complete: bool = True) -> None:
        """Called when the generation ends (`complete`), also when it raised (`complete=False`)."""
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

    def finish(self, complete: bool = True) -> None:
        pass


class CpuStorage(MemoryStorage):
    """Values copied to host memory as they are recorded."""

    kind = "cpu"

    def prepare(self, value: torch.Tensor, produced: torch.Tensor) -> torch.Tensor:
        return to_host(value)


class DiskStorage:
    """A directory of safetensors shards, one per (canvas, step), with a manifest and a completion marker.

    Each shard is written to a temporary name and renamed, then its manifest line (every tensor's name,
    shape and dtype, the canvas and step, the file size) is appended, so an interrupted run leaves
    complete, listed shards. `complete.json`, written last when the generation ends normally, marks the
    cache finished. The directory must be new or empty unless `overwrite=True`, which replaces the
    cache files there (and only those). A storage opened with `DiskStorage.open` is read-only and was
    checked against its manifest.
    """

    kind = "disk"

    def __init__(self, path: str | Path, *, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.overwrite = overwrite
        self.read_only = False
        self.complete = False
        self._files: dict[tuple[int, int], str] = {}
        self._record: dict[str, Any] = {}
        self._started = False

    @classmethod
    def open(cls, path: str | Path, *, allow_partial: bool = False) -> tuple[DiskStorage, dict[str, Any]]:
        """The storage of a cache directory (read-only) and the record spec it was written with, after
        checking every shard against the manifest; an unfinished cache only with `allow_partial`."""
        storage = cls(path)
        meta = read_metadata(storage.path)
        entries, storage.complete = verify_cache(storage.path, meta, allow_partial=allow_partial)
        storage.read_only, storage._record = True, meta["record"]
        storage._files = {(entry["canvas"], entry["step"]): entry["file"] for entry in entries}
        return storage, meta["record"]

    def prepare(self, value: torch.Tensor, produced: torch.Tensor) -> torch.Tensor:
        return to_host(value)

    def put(self, canvas: int, step: int, values: dict[str, torch.Tensor]) -> None:
        if self.read_only:
            raise RuntimeError(f"{self.path} was reopened read-only; record into a new directory")
        self._start()
        fname = shard_name(canvas, step)
        tensors = {k: v.contiguous() for k, v in values.items()}
        tmp = self.path / (fname + ".tmp")
        # The shard names its own canvas and step, so a shard renamed or swapped for another is caught.
        save_file(tensors, str(tmp), metadata={"canvas": str(canvas), "step": str(step)})
        os.replace(tmp, self.path / fname)  # a shard is either complete or absent
        described = {n: {"dtype": encode_dtype(t.dtype), "shape": list(t.shape)} for n, t in sorted(tensors.items())}
        entry = {
            "canvas": canvas,
            "step": step,
            "file": fname,
            "bytes": (self.path / fname).stat().st_size,
            "tensors": described,
        }
        with open(self.path / MANIFEST_FILE, "a", encoding="utf-8") as manifest:
            manifest.write(json.dumps(entry, separators=(",", ":")) + "\n")
        self._files[(canvas, step)] = fname

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
        """Check the directory can be written (before the generation) and keep the record; nothing is
        written until the first shard, so a run refused later (e.g. by max_bytes) leaves no trace."""
        if self.read_only:
            return
        check_target(self.path, self.overwrite)
        self._record = record

    def finish(self, complete: bool = True) -> None:
        """Write the completion marker when the generation ended normally (`complete`); an interrupted
        run leaves its finished shards and manifest, without the marker."""
        if self.read_only or (not complete and not self._started):
            return
        self._start()
        if complete:
            write_completion(self.path, len(self._files))
            self.complete = True

    def _start(self) -> None:
        if self._started:
            return
        if self.overwrite:
            remove_cache_files(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        write_metadata(self.path, self._record)
        (self.path / MANIFEST_FILE).write_text("")
        self._started = True


def make_storage(kind: str, path: str | Path | None, overwrite: bool = False) -> CacheStorage:
    """The storage named by `kind` ("memory", "cpu" or "disk"; disk needs `path`, and `overwrite=True`
    to replace a cache already there)."""
    if kind not in STORAGE_KINDS:
        raise ValueError(f"storage must be 'memory', 'cpu' or 'disk', got {kind!r}")
    if kind == "disk":
        if path is None:
            raise ValueError("storage='disk' needs path=<directory to write the shards into>")
        return DiskStorage(path, overwrite=overwrite)
    if path is not None:
        raise ValueError(f"path= is where storage='disk' writes; drop it or pass storage='disk' (got {kind!r})")
    if overwrite:
        raise ValueError(f"overwrite= applies to storage='disk'; drop it (got storage={kind!r})")
    return CpuStorage() if kind == "cpu" else MemoryStorage()


def to_host(value: torch.Tensor) -> torch.Tensor:
    """A host-memory copy that owns its storage (pinned when CUDA is present)."""
    if value.device.type == "cpu":
        return value.clone()
    host = torch.empty(value.shape, dtype=value.dtype, pin_memory=torch.cuda.is_available())
    return host.copy_(value, non_blocking=False)


# ---------------------------------------------------------------------- the file format
class CacheIntegrityError(ValueError):
    """A disk cache is unfinished, or its files do not match its manifest."""


def shard_name(canvas: int, step: int) -> str:
    return f"canvas{canvas:04d}_{'encoder' if step == ENCODER else f'step{step:04d}'}.safetensors"


def check_target(path: Path, overwrite: bool) -> None:
    """Refuse to record into `path` when it is a file, or a directory holding anything (another cache
    or other files), unless `overwrite` (which then replaces the cache files there)."""
    if not path.exists():
        return
    if not path.is_dir():
        raise FileExistsError(f"path={str(path)!r} is a file; give a directory (new or empty) for the disk cache")
    held = sorted(p.name for p in path.iterdir())
    if not held or overwrite:
        return
    what = "another DenoisingCache" if META_FILE in held else f"{len(held)} file(s) ({', '.join(held[:5])})"
    raise FileExistsError(
        f"path={str(path)!r} already holds {what}; recording there would overwrite it. Give a new or empty "
        "directory, or pass overwrite=True to replace the cache files there"
    )


def remove_cache_files(path: Path) -> None:
    """Delete the files a cache writes (marker first, so no half-removed cache reads as finished)."""
    if not path.is_dir():
        return
    for name in (COMPLETE_FILE, MANIFEST_FILE, META_FILE):
        (path / name).unlink(missing_ok=True)
    for file in path.iterdir():
        if _SHARD_PATTERN.fullmatch(file.name.removesuffix(".tmp")) or file.name.endswith(f"{META_FILE}.tmp"):
            file.unlink()


def write_metadata(path: Path, record: dict[str, Any]) -> None:
    _write_atomic(path / META_FILE, json.dumps({"format_version": CACHE_FORMAT_VERSION, "record": record}, indent=1))


def write_completion(path: Path, n_shards: int) -> None:
    """The completion marker, written last: the shard count and digests of the metadata and manifest
    it closes, so a manifest or record edited afterwards no longer matches it."""
    marker = {"shards": n_shards, **_digests(path)}
    _write_atomic(path / COMPLETE_FILE, json.dumps(marker, indent=1))


def _digests(path: Path) -> dict[str, str]:
    return {
        f"{name.split('.')[0]}_sha256": hashlib.sha256((path / name).read_bytes()).hexdigest()
        for name in (META_FILE, MANIFEST_FILE)
    }


def _write_atomic(target: Path, text: str) -> None:
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, target)


def read_metadata(path: Path) -> dict[str, Any]:
    """`cache.json` of a cache directory, checked: its format version is this one."""
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
            "read: it lacks the manifest a reopened cache is checked against; record the run again"
        )
    return meta


def verify_cache(path: Path, meta: dict[str, Any], *, allow_partial: bool) -> tuple[list[dict[str, Any]], bool]:
    """The manifest entries of a cache directory, each checked against its shard, and whether the cache
    is complete. Refuses (CacheIntegrityError) an unfinished cache unless `allow_partial`, and any shard
    that is missing, renamed, swapped, resized, or whose tensors differ in name, shape or dtype from the
    manifest. Reads only the shards' headers."""
    complete = (path / COMPLETE_FILE).exists()
    entries = _read_manifest(path, complete)
    redo = "record the run again (or restore the cache's original files)"
    if complete:
        marker = json.loads((path / COMPLETE_FILE).read_text())
        if marker != {"shards": len(entries), **_digests(path)}:
            raise CacheIntegrityError(
                f"{path}: {META_FILE} or {MANIFEST_FILE} changed after the cache was completed (they no longer match "
                f"{COMPLETE_FILE}); {redo}"
            )
    seen: set[tuple[int, int]] = set()
    for entry in entries:
        key = _check_entry(path, entry, meta["record"], redo)
        if key in seen:
            raise CacheIntegrityError(f"{path}/{MANIFEST_FILE} lists {entry['file']} twice; {redo}")
        seen.add(key)
    if not complete and not allow_partial:
        raise CacheIntegrityError(
            f"{path} is an unfinished cache: the run that wrote it stopped before the end (no {COMPLETE_FILE}); "
            f"it holds {describe_steps(entries)}. Pass allow_partial=True to read what finished, or record the "
            "run again"
        )
    for entry in entries:
        _check_shard(path, entry, redo)
    if complete:
        listed = {entry["file"] for entry in entries}
        extra = sorted(p.name for p in path.iterdir() if _SHARD_PATTERN.fullmatch(p.name) and p.name not in listed)
        if extra:
            raise CacheIntegrityError(
                f"{path} holds shard(s) its manifest does not list: {', '.join(extra)}; remove them or {redo}"
            )
    return entries, complete


def describe_steps(entries: list[dict[str, Any]]) -> str:
    """'canvas 0: encoder, steps [0, 1, 2]; canvas 1: …' for manifest entries."""
    by_canvas: dict[int, list[int]] = {}
    for entry in entries:
        by_canvas.setdefault(entry["canvas"], []).append(entry["step"])
    if not by_canvas:
        return "no finished step"
    parts = []
    for canvas, steps in sorted(by_canvas.items()):
        denoising = sorted(s for s in steps if s != ENCODER)
        parts.append(f"canvas {canvas}: " + ("encoder, " if ENCODER in steps else "") + f"steps {denoising}")
    return "; ".join(parts)


def _read_manifest(path: Path, complete: bool) -> list[dict[str, Any]]:
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.exists():
        raise CacheIntegrityError(f"{path} holds no {MANIFEST_FILE}; record the run again")
    text = manifest_path.read_text()
    lines = text.split("\n")
    entries = []
    for number, line in enumerate(lines, start=1):
        if not line:
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            # A run killed while appending leaves its last line cut short: that shard did not finish.
            if not complete and number == len(lines):
                break
            raise CacheIntegrityError(
                f"{manifest_path} line {number} is not valid JSON; record the run again"
            ) from None
    return entries


def _check_entry(path: Path, entry: Any, record: dict[str, Any], redo: str) -> tuple[int, int]:
    where = f"{path}/{MANIFEST_FILE}"
    if not isinstance(entry, dict) or set(entry) != {"canvas", "step", "file", "bytes", "tensors"}:
        raise CacheIntegrityError(f"{where} holds a malformed entry {str(entry)[:200]}; {redo}")
    canvas, step, fname = entry["canvas"], entry["step"], entry["file"]
    if not isinstance(canvas, int) or not isinstance(step, int) or fname != shard_name(canvas, step):
        raise CacheIntegrityError(
            f"{where} names shard file {fname!r} for canvas {canvas!r}, step {step!r} (expected "
            f"{shard_name(canvas, step) if isinstance(canvas, int) and isinstance(step, int) else 'int canvas/step'})"
            f"; refusing to open it: {redo}"
        )
    steps, canvases = record["steps"], record["canvases"]
    step_in_run = 0 <= step and (record["max_steps"] is None or step < record["max_steps"])
    step_ok = step == ENCODER or (step_in_run and (steps is None or step in steps))
    canvas_ok = 0 <= canvas < record["max_canvases"] and (canvases is None or canvas in canvases)
    if not (step_ok and canvas_ok):
        raise CacheIntegrityError(f"{where} lists {fname}, a canvas/step this cache was not recording; {redo}")
    tensors = entry["tensors"]
    well_formed = isinstance(entry["bytes"], int) and isinstance(tensors, dict)
    if not well_formed or not all(isinstance(v, dict) and set(v) == {"dtype", "shape"} for v in tensors.values()):
        raise CacheIntegrityError(f"{where} holds a malformed entry for {fname}; {redo}")
    unknown = sorted(set(tensors) - set(record["names"]))
    if unknown:
        raise CacheIntegrityError(f"{where} lists tensor(s) {', '.join(unknown)} this cache never recorded; {redo}")
    return canvas, step


def _check_shard(path: Path, entry: dict[str, Any], redo: str) -> None:
    file = path / entry["file"]
    if not file.is_file():
        raise CacheIntegrityError(f"{file} is listed in the manifest but missing; {redo}")
    size = file.stat().st_size
    metadata, header = _shard_header(file, size, redo)
    written_for = (metadata.get("canvas"), metadata.get("step"))
    if written_for != (str(entry["canvas"]), str(entry["step"])):
        raise CacheIntegrityError(
            f"{file} holds the values of canvas {written_for[0]}, step {written_for[1]}, not those of canvas "
            f"{entry['canvas']}, step {entry['step']} its name and the manifest give (renamed or swapped); {redo}"
        )
    listed = entry["tensors"]
    extra, missing = sorted(set(header) - set(listed)), sorted(set(listed) - set(header))
    if extra or missing:
        raise CacheIntegrityError(
            f"{file} holds tensors the manifest does not list ({', '.join(extra) or 'none'}) and lacks listed ones "
            f"({', '.join(missing) or 'none'}); {redo}"
        )
    for name, info in header.items():
        stored = {"dtype": _SAFETENSORS_DTYPES.get(info.get("dtype"), info.get("dtype")), "shape": info.get("shape")}
        if stored != listed[name]:
            raise CacheIntegrityError(
                f"{file}: {name} is {stored['dtype']} {stored['shape']}, the manifest says {listed[name]['dtype']} "
                f"{listed[name]['shape']}; {redo}"
            )
    if size != entry["bytes"]:
        raise CacheIntegrityError(
            f"{file} has {size} bytes, the manifest says {entry['bytes']} (truncated or replaced); {redo}"
        )


def _shard_header(file: Path, size: int, redo: str) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """A safetensors file's metadata and per-tensor header (dtype, shape, offsets), read without its data."""
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < length <= size - 8:
            raise CacheIntegrityError(f"{file} is not a safetensors file; {redo}")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CacheIntegrityError(f"{file} has an unreadable safetensors header; {redo}") from None
    if not isinstance(header, dict):
        raise CacheIntegrityError(f"{file} has an unreadable safetensors header; {redo}")
    metadata = header.pop("__metadata__", None) or {}
    return metadata, header


def encode_dtype(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def decode_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{META_FILE} names an unknown dtype {name!r}")
    return dtype
