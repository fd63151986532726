"""Disk caches are verified when reopened (manifest, completion marker, every shard's header) and never
written over another cache or other files unless overwrite=True is passed."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from reference import CANVAS
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffusionlens import CacheBudgetError, CacheIntegrityError, DenoisingCache, RecordSpec, ReplayNoise
from diffusionlens.cli import main
from diffusionlens.distributed.sweeps import harvest_distributed

GEN = dict(max_denoising_steps=4, noise=ReplayNoise(4), progress=False, eos_token_id=None)
NAMES = ["encoder.hook_embed", "decoder.blocks.1.hook_resid_post", "sampler.hook_entropy"]
RESID = "decoder.blocks.1.hook_resid_post"
REDO = "record the run again"


def record(model, ids, path, **kwargs):
    kw = dict(names_filter=NAMES, max_new_tokens=CANVAS["mixed"], storage="disk", path=path, **GEN)
    return model.generate_with_cache(ids, **{**kw, **kwargs})


@pytest.fixture(scope="module")
def written(model, ids, tmp_path_factory):
    """One finished cache and the in-memory values it must hold; tests edit copies of it."""
    path = tmp_path_factory.mktemp("written") / "cache"
    record(model, ids, path)
    _, memory = model.generate_with_cache(ids, names_filter=NAMES, max_new_tokens=CANVAS["mixed"], **GEN)
    return path, memory


@pytest.fixture
def cache_dir(written, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(written[0], copy)
    return copy


def manifest(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "manifest.jsonl").read_text().splitlines()]


def rewrite_shard(path: Path, fname: str, edit) -> None:
    """Rewrite one shard through `edit(tensors)`, keeping the canvas/step metadata it was written with."""
    with safe_open(str(path / fname), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path / fname))
    edit(tensors)
    save_file(tensors, str(path / fname), metadata=metadata)


def refusal(path: Path, match: str, allow_partial: bool = False) -> str:
    """The CacheIntegrityError loading `path` raises: it must match `match` and name the fix."""
    with pytest.raises(CacheIntegrityError, match=match) as error:
        DenoisingCache.load(path, allow_partial=allow_partial)
    assert REDO in str(error.value), str(error.value)
    return str(error.value)


# ---------------------------------------------------------------------- what is written, and read back
def test_the_manifest_lists_every_tensor_and_the_marker_comes_last(written, model, ids, tmp_path):
    path, memory = written
    entries = manifest(path)
    assert [(e["canvas"], e["step"]) for e in entries] == [(0, -1), (0, 0), (0, 1), (0, 2), (0, 3)]
    for entry in entries:
        tensors = load_file(str(path / entry["file"]))
        assert entry["tensors"] == {
            n: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)} for n, t in tensors.items()
        }
        assert entry["bytes"] == (path / entry["file"]).stat().st_size
    marker = json.loads((path / "complete.json").read_text())
    assert marker["shards"] == len(entries)
    reopened = DenoisingCache.load(path)
    assert reopened.complete
    for name in NAMES:
        assert torch.equal(reopened[name], memory[name])


def test_an_interrupted_cache_is_refused_without_allow_partial(model, ids, tmp_path):
    def interrupt(x, hook):
        if hook.ctx.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        record(model, ids, tmp_path / "c", fwd_hooks=[("decoder.hook_embed", interrupt)])
    assert not (tmp_path / "c" / "complete.json").exists()
    with pytest.raises(CacheIntegrityError) as error:
        DenoisingCache.load(tmp_path / "c")
    assert "unfinished" in str(error.value) and "allow_partial=True" in str(error.value)
    assert "canvas 0: encoder, steps [0, 1]" in str(error.value)


def test_allow_partial_reads_what_finished_and_says_which_steps(model, ids, written, tmp_path):
    def interrupt(x, hook):
        if hook.ctx.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        record(model, ids, tmp_path / "c", fwd_hooks=[("decoder.hook_embed", interrupt)])
    with pytest.warns(UserWarning, match=r"unfinished.*canvas 0: encoder, steps \[0, 1\]"):
        partial = DenoisingCache.load(tmp_path / "c", allow_partial=True)
    assert not partial.complete and partial.steps(0) == [0, 1]
    assert torch.equal(partial[RESID], written[1][RESID][:2])


def test_a_manifest_line_cut_short_by_a_kill_is_dropped_from_a_partial_cache(cache_dir):
    (cache_dir / "complete.json").unlink()
    text = (cache_dir / "manifest.jsonl").read_text()
    (cache_dir / "manifest.jsonl").write_text(text[: text.rindex("{") + 20])  # killed mid-append
    with pytest.warns(UserWarning, match=r"steps \[0, 1, 2\]"):
        partial = DenoisingCache.load(cache_dir, allow_partial=True)
    assert partial.steps(0) == [0, 1, 2]


def test_a_finished_cache_loads_with_allow_partial_too_without_a_warning(written, recwarn):
    assert DenoisingCache.load(written[0], allow_partial=True).complete
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


# ---------------------------------------------------------------------- altered caches
def test_a_shard_with_another_shape_is_refused(cache_dir):
    transposed = lambda t: t.update({RESID: t[RESID].transpose(0, 1).contiguous()})  # noqa: E731
    rewrite_shard(cache_dir, "canvas0000_step0001.safetensors", transposed)
    message = refusal(cache_dir, "the manifest says float32 \\[2,")
    assert "canvas0000_step0001" in message and RESID in message


def test_a_shard_with_another_dtype_is_refused(cache_dir):
    rewrite_shard(cache_dir, "canvas0000_step0002.safetensors", lambda t: t.update({RESID: t[RESID].view(torch.int32)}))
    refusal(cache_dir, rf"{RESID} is int32 .* the manifest says float32")


def test_a_tensor_injected_into_a_shard_is_refused(cache_dir):
    injected = "decoder.blocks.0.hook_attn_out"
    rewrite_shard(cache_dir, "canvas0000_step0001.safetensors", lambda t: t.update({injected: t[RESID].clone()}))
    refusal(cache_dir, f"tensors the manifest does not list \\({injected}\\)")


def test_a_tensor_injected_into_shard_and_manifest_is_refused(cache_dir):
    injected = "decoder.blocks.0.hook_attn_out"
    rewrite_shard(cache_dir, "canvas0000_step0001.safetensors", lambda t: t.update({injected: t[RESID].clone()}))
    entries = manifest(cache_dir)
    entries[2]["tensors"][injected] = entries[2]["tensors"][RESID]
    entries[2]["bytes"] = (cache_dir / entries[2]["file"]).stat().st_size
    (cache_dir / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    refusal(cache_dir, "changed after the cache was completed")
    (cache_dir / "complete.json").unlink()  # even as a partial cache, the hook was never recorded
    refusal(cache_dir, f"tensor.*{injected} this cache never recorded", allow_partial=True)


def test_swapped_shards_are_refused(cache_dir):
    one, two = cache_dir / "canvas0000_step0001.safetensors", cache_dir / "canvas0000_step0002.safetensors"
    one.rename(cache_dir / "swap")
    two.rename(one)
    (cache_dir / "swap").rename(two)
    message = refusal(cache_dir, "holds the values of canvas 0, step 2, not those of canvas 0, step 1")
    assert "renamed or swapped" in message


def test_a_manifest_entry_pointing_at_another_shard_is_refused(cache_dir):
    (cache_dir / "complete.json").unlink()
    entries = manifest(cache_dir)
    entries[1]["file"] = entries[2]["file"]
    (cache_dir / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    refusal(cache_dir, "names shard file 'canvas0000_step0001.safetensors' for canvas 0", allow_partial=True)


def test_a_truncated_shard_is_refused(cache_dir):
    shard = cache_dir / "canvas0000_step0003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    refusal(cache_dir, "canvas0000_step0003.safetensors has .* bytes.*truncated")


def test_a_shard_that_is_not_safetensors_is_refused(cache_dir):
    (cache_dir / "canvas0000_step0003.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"junk")
    refusal(cache_dir, "canvas0000_step0003.safetensors is not a safetensors file")


def test_a_deleted_shard_is_refused(cache_dir):
    (cache_dir / "canvas0000_step0002.safetensors").unlink()
    refusal(cache_dir, "canvas0000_step0002.safetensors is listed in the manifest but")


def test_a_shard_the_manifest_does_not_list_is_refused(cache_dir):
    shutil.copy(cache_dir / "canvas0000_step0003.safetensors", cache_dir / "canvas0000_step0009.safetensors")
    refusal(cache_dir, "does not list: canvas0000_step0009.safetensors; remove them")


def test_a_manifest_edited_after_completion_is_refused(cache_dir):
    entries = manifest(cache_dir)
    del entries[-1]  # hides step 3
    (cache_dir / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    refusal(cache_dir, "manifest.jsonl changed after the cache was completed")


def test_a_record_edited_after_completion_is_refused(cache_dir):
    meta = json.loads((cache_dir / "cache.json").read_text())
    meta["record"]["positions"] = [0, 1]  # would mislabel which positions the values are
    (cache_dir / "cache.json").write_text(json.dumps(meta))
    refusal(cache_dir, "cache.json or manifest.jsonl changed after")


def test_a_step_outside_the_recorded_selection_is_refused(model, ids, tmp_path):
    record(model, ids, tmp_path / "c", steps=[0, 2])
    entries = manifest(tmp_path / "c")
    (tmp_path / "c" / "complete.json").unlink()
    shard = tmp_path / "c" / "canvas0000_step0002.safetensors"
    shard.rename(tmp_path / "c" / "canvas0000_step0001.safetensors")
    entries[-1].update(step=1, file="canvas0000_step0001.safetensors")
    (tmp_path / "c" / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    refusal(tmp_path / "c", "canvas0000_step0001.safetensors, a canvas/step this cache was not", allow_partial=True)


# ---------------------------------------------------------------------- never over another cache
def test_recording_into_a_directory_holding_a_cache_is_refused_before_the_run(model, ids, cache_dir):
    before = {p.name: p.read_bytes() for p in cache_dir.iterdir()}
    fired = []
    with pytest.raises(FileExistsError) as error:
        record(model, ids, cache_dir, fwd_hooks=[("decoder.hook_embed", lambda x, hook: fired.append(1))])
    assert "already holds another DenoisingCache" in str(error.value) and "overwrite=True" in str(error.value)
    assert fired == [], "the generation ran before the refusal"
    assert {p.name: p.read_bytes() for p in cache_dir.iterdir()} == before
    assert DenoisingCache.load(cache_dir).complete


def test_recording_into_a_directory_holding_other_files_is_refused(model, ids, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"already holds 1 file\(s\) \(notes.txt\).*overwrite=True"):
        record(model, ids, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_recording_into_a_file_is_refused(model, ids, tmp_path):
    (tmp_path / "c").write_text("")
    with pytest.raises(FileExistsError, match="is a file; give a directory"):
        record(model, ids, tmp_path / "c")


def test_a_record_spec_refuses_the_same_way(model, ids, cache_dir):
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.generate_with_cache(ids, record=RecordSpec(names_filter=NAMES, storage="disk", path=cache_dir), **GEN)


def test_overwrite_replaces_the_old_cache_files_and_only_those(model, ids, cache_dir, written):
    (cache_dir / "notes.txt").write_text("mine")
    spec = RecordSpec(names_filter=[RESID], steps=[0], storage="disk", path=cache_dir, overwrite=True)
    model.generate_with_cache(ids, record=spec, max_new_tokens=CANVAS["mixed"], **GEN)
    names = sorted(p.name for p in cache_dir.iterdir())
    assert names == ["cache.json", "canvas0000_step0000.safetensors", "complete.json", "manifest.jsonl", "notes.txt"]
    again = DenoisingCache.load(cache_dir)
    assert again.names == [RESID] and again.steps(0) == [0]
    assert torch.equal(again.get(RESID, step=0), written[1].get(RESID, step=0))


def test_overwrite_is_checked_and_belongs_to_disk_storage(tmp_path):
    with pytest.raises(ValueError, match="overwrite= applies to storage='disk'; drop it"):
        RecordSpec(overwrite=True)
    with pytest.raises(TypeError, match="overwrite must be True or False"):
        RecordSpec(storage="disk", path=tmp_path, overwrite="yes")
    spec = RecordSpec(storage="disk", path=tmp_path, overwrite=True)
    assert RecordSpec.merged(spec, storage="memory") == RecordSpec()  # a memory override drops path and overwrite


def test_a_refused_budget_writes_nothing(model, ids, tmp_path):
    with pytest.raises(CacheBudgetError):
        record(model, ids, tmp_path / "c", max_bytes=10)
    assert not (tmp_path / "c").exists()


def test_the_trace_command_refuses_an_existing_cache_before_loading_and_overwrites_when_asked(tmp_path, monkeypatch):
    import diffusionlens.cli as cli

    out = tmp_path / "run"
    argv = ["trace", "--prompt", "reverse 7 2:", "--out", str(out), "--cache", RESID, "--max-steps", "2"]
    main([*argv, "--no-progress"])
    loads = []
    real_load = cli._load
    monkeypatch.setattr(cli, "_load", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    with pytest.raises(SystemExit, match="already holds another DenoisingCache.*--overwrite"):
        main([*argv, "--no-progress"])
    assert loads == []
    main([*argv, "--no-progress", "--overwrite"])
    assert DenoisingCache.load(out / "cache").complete


def test_a_harvest_refuses_run_directories_that_hold_anything_before_any_task(cache_dir, tmp_path):
    out = tmp_path / "harvest"
    shutil.copytree(cache_dir, out / "run_00001")
    with pytest.raises(FileExistsError, match="run_00001.*overwrite=True"):
        harvest_distributed(None, ["a", "b"], out, progress=False)  # refused before the pool is used
