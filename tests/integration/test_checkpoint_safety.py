"""A checkpoint reads only files inside its own directory, and a mistyped local path never goes to the hub."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from reference import build_pair

from diffusionlens import HookedDiffusionGemma
from diffusionlens.weights.checkpoint import CheckpointError

INSIDE_ONLY = "reads only files inside its own directory"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A sharded checkpoint, saved once; each test copies it so its edits stay its own."""
    directory = tmp_path_factory.mktemp("sharded")
    build_pair("mixed", seed=7)[1].save_pretrained(directory, max_shard_size="20KB")
    return directory


@pytest.fixture
def checkpoint(sharded, tmp_path):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    for file in sharded.iterdir():
        (directory / file.name).write_bytes(file.read_bytes())
    return directory


def _point_first_shard_at(directory: Path, target: str) -> str:
    """Rewrite the index so every tensor of the first shard is read from `target`; returns that shard's name."""
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"] = {k: (target if v == first else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    return first


def _refusal(directory: Path, monkeypatch) -> str:
    opened = []
    import diffusionlens.weights.checkpoint as loading

    real = loading.safe_open
    monkeypatch.setattr(loading, "safe_open", lambda path, **kw: opened.append(path) or real(path, **kw))
    with pytest.raises(CheckpointError) as error:
        HookedDiffusionGemma.from_pretrained(directory, progress=False)
    assert opened == [], "a shard was opened before the index was checked"
    return str(error.value)


def test_a_shard_that_climbs_out_of_the_directory_is_refused(checkpoint, monkeypatch):
    victim = checkpoint.parent / "victim"
    victim.mkdir()
    first = sorted(f.name for f in checkpoint.glob("model-*.safetensors"))[0]
    (victim / "model.safetensors").write_bytes((checkpoint / first).read_bytes())
    _point_first_shard_at(checkpoint, "../victim/model.safetensors")
    message = _refusal(checkpoint, monkeypatch)
    assert "'../victim/model.safetensors'" in message and INSIDE_ONLY in message


def test_an_absolute_shard_path_is_refused_and_not_called_truncated(checkpoint, monkeypatch):
    _point_first_shard_at(checkpoint, "/etc/passwd")
    message = _refusal(checkpoint, monkeypatch)
    assert "'/etc/passwd'" in message and INSIDE_ONLY in message and "truncated" not in message


def test_a_shard_symlink_escaping_the_directory_is_refused(checkpoint, tmp_path, monkeypatch):
    outside = tmp_path / "elsewhere.safetensors"
    first = sorted(f.name for f in checkpoint.glob("model-*.safetensors"))[0]
    os.replace(checkpoint / first, outside)
    (checkpoint / first).symlink_to(outside)
    message = _refusal(checkpoint, monkeypatch)
    assert first in message and "symlink" in message and str(outside) in message and INSIDE_ONLY in message


def test_a_single_file_symlink_escaping_the_directory_is_refused(tmp_path, monkeypatch):
    directory, outside = tmp_path / "single", tmp_path / "weights.safetensors"
    build_pair("mixed", seed=7)[1].save_pretrained(directory)
    os.replace(directory / "model.safetensors", outside)
    (directory / "model.safetensors").symlink_to(outside)
    message = _refusal(directory, monkeypatch)
    assert "model.safetensors" in message and str(outside) in message and INSIDE_ONLY in message


def test_an_index_with_a_non_string_shard_is_refused(checkpoint, monkeypatch):
    _point_first_shard_at(checkpoint, 7)
    message = _refusal(checkpoint, monkeypatch)
    assert "not file names: 7" in message


def test_a_symlink_inside_the_directory_and_a_hub_cache_snapshot_still_load(sharded, tmp_path):
    expected = HookedDiffusionGemma.from_pretrained(sharded, progress=False)
    # the hub cache layout: models--org--name/snapshots/<revision>/<file> -> ../../blobs/<hash>
    repo = tmp_path / "models--org--name"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, file in enumerate(sorted(sharded.iterdir())):
        (blobs / f"blob{i}").write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(Path("../../blobs") / f"blob{i}")
    loaded = HookedDiffusionGemma.from_pretrained(snapshot, progress=False)
    for (name, a), (_, b) in zip(loaded.state_dict().items(), expected.state_dict().items(), strict=True):
        assert a.equal(b), name


@pytest.mark.parametrize("typo", ["runs/my_ckpt", "./my_ckpt", "../my_ckpt", "runs/deeper/my_ckpt"])
def test_a_mistyped_local_path_is_not_sent_to_the_hub(tmp_path, monkeypatch, typo):
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "my_ckpt_v2").mkdir()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail(f"{typo} went to the hub"))
    with pytest.raises(FileNotFoundError) as error:
        HookedDiffusionGemma.from_pretrained(typo, progress=False)
    assert repr(typo) in str(error.value) and "check the path" in str(error.value)
    if typo == "runs/my_ckpt":
        assert "my_ckpt_v2" in str(error.value) and "snapshot_download" in str(error.value)


def test_a_path_object_is_never_sent_to_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("went to the hub"))
    with pytest.raises(FileNotFoundError, match="check the path"):
        HookedDiffusionGemma.from_pretrained(Path("org/name"), progress=False)


def test_an_org_name_id_with_no_local_match_still_goes_to_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    asked = []

    def fake_download(repo_id, **kwargs):
        asked.append(repo_id)
        raise ConnectionError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    with pytest.raises(ConnectionError):
        HookedDiffusionGemma.from_pretrained("google/some-model", progress=False)
    assert asked == ["google/some-model"]
