"""`weights.tensor_file`: the one file format of the tuned lens and the transcoder set (#31)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from diffusionlens.weights.tensor_file import load_tensor_file, save_tensor_file


def test_tensors_and_json_fields_round_trip(tmp_path):
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.long)}
    fields = {"config": {"z": 1, "a": [1, 2]}, "steps": 48, "tables": True, "note": None}
    path = save_tensor_file(tmp_path / "deep" / "file.safetensors", tensors, "kind-1", fields)
    header, loaded = load_tensor_file(path, "kind-1", "kind file")
    assert header == fields
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    with safe_open(str(path), framework="pt") as handle:
        raw = handle.metadata()
    # keys sorted, so the same values always write the same header
    assert raw == {
        "format": "kind-1",
        "config": '{"a": [1, 2], "z": 1}',
        "steps": "48",
        "tables": "true",
        "note": "null",
    }


def test_a_missing_file_or_another_format_is_refused_naming_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no kind file at .*nothing.safetensors \(try this\)"):
        load_tensor_file(tmp_path / "nothing.safetensors", "kind-1", "kind file", missing_hint=" (try this)")
    path = save_tensor_file(tmp_path / "other.safetensors", {"a": torch.zeros(1)}, "other-1", {})
    with pytest.raises(ValueError, match="is not a diffusionlens kind file \\(format 'other-1'\\)"):
        load_tensor_file(path, "kind-1", "kind file")
