"""Files of tensors trained for one model (a tuned lens, a transcoder set): one safetensors file whose header
names the file's format and holds every other field as JSON. Loading refuses a missing file or another format,
before any tensor is read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def save_tensor_file(
    path: str | Path, tensors: dict[str, torch.Tensor], file_format: str, fields: dict[str, Any]
) -> Path:
    """Write `tensors` to `path` (its folder made if need be) with a header: `format` is `file_format`, and each
    of `fields` is stored as JSON (keys sorted, so equal values give equal headers)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": file_format, **{name: json.dumps(value, sort_keys=True) for name, value in fields.items()}}
    save_file(tensors, str(path), metadata=header)
    return path


def load_tensor_file(
    path: str | Path, file_format: str, what: str, *, missing_hint: str = ""
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The header fields (read back from JSON) and the tensors of a file `save_tensor_file` wrote as
    `file_format`. A missing file or one of another format is refused, naming `what` was expected (and
    `missing_hint` after a missing file's path)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}{missing_hint}")
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata() or {}
    if header.get("format") != file_format:
        raise ValueError(f"{path} is not a diffusionlens {what} (format {header.get('format')!r})")
    fields = {name: json.loads(value) for name, value in header.items() if name != "format"}
    return fields, load_file(str(path))
