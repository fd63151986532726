"""CacheStorage backends, RecordSpec, and a reopened disk cache that behaves exactly like the one written."""

from __future__ import annotations

import json

import pytest
import torch
from reference import CANVAS

from diffusionlens import DenoisingCache, RecordSpec, ReplayNoise
from diffusionlens.cache.storage import CACHE_FORMAT_VERSION, CpuStorage, DiskStorage, MemoryStorage

GEN = dict(max_denoising_steps=5, noise=ReplayNoise(4), progress=False, eos_token_id=None)
NAMES = ["encoder.hook_embed", "decoder.blocks.1.hook_resid_post", "sampler.hook_entropy", "decoder.hook_logits"]


def _outcome(call):
    """What a call returns, or the type and message of what it raises: for call-by-call comparison."""
    try:
        return "value", call()
    except (KeyError, ValueError, IndexError) as error:
        return type(error).__name__, str(error)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def test_reopened_cache_behaves_like_the_written_one_call_by_call(model, ids, tmp_path):
    record = RecordSpec(
        names_filter=NAMES, steps=[0, 2, 3, -1], canvases=[1], dtype=torch.float16, storage="disk", path=tmp_path / "c"
    )
    result, written = model.generate_with_cache(ids, record=record, max_new_tokens=CANVAS["mixed"] * 2, **GEN)
    reopened = DenoisingCache.load(tmp_path / "c", model=model)
    assert reopened.record() == written.record()
    assert (reopened.names, reopened.positions, reopened.dtype, reopened.storage) == (
        written.names,
        written.positions,
        written.dtype,
        written.storage,
    )
    assert written.canvases() == [1] and reopened.canvases() == [1]
    ran = result.trace.steps(1)
    assert written.steps(1) == [s for s in (0, 2, 3, 4) if s < ran]
    calls = [lambda c: c.steps(0), lambda c: c.steps(1), lambda c: c.canvases(), lambda c: len(c.step_cache(0, 1))]
    for canvas in (0, 1):
        for step in (None, 0, 1, 2, 4):
            for wanted in (canvas, step):
                calls.append(lambda c, canvas=canvas, step=wanted: c.wants(canvas, step))
            for name in [*NAMES, "decoder.blocks.1.hook_resid_psot"]:
                calls.append(lambda c, name=name, canvas=canvas, step=step: c.get(name, canvas=canvas, step=step))
    calls += [lambda c, name=name: c[name] for name in NAMES]
    calls.append(lambda c: "decoder.hook_logits" in c)
    for call in calls:
        got, want = _outcome(lambda call=call: call(reopened)), _outcome(lambda call=call: call(written))
        assert got[0] == want[0] and _same(got[1], want[1]), (got, want)
    assert written.get("decoder.blocks.1.hook_resid_post", canvas=1, step=0).dtype == torch.float16
    assert reopened.step_cache(0, canvas=1).model is model  # load(model=...) reaches the single-pass helpers
    with pytest.raises(RuntimeError, match="read-only"):
        reopened.backend.put(0, 0, {"x": torch.zeros(1)})


def test_memory_cpu_and_disk_storage_hold_the_same_values(model, ids, tmp_path):
    kw = dict(names_filter=NAMES, positions=[0, 2], max_new_tokens=CANVAS["mixed"], **GEN)
    _, memory = model.generate_with_cache(ids, **kw)
    _, cpu = model.generate_with_cache(ids, storage="cpu", **kw)
    _, disk = model.generate_with_cache(ids, storage="disk", path=tmp_path / "d", **kw)
    assert isinstance(memory.backend, MemoryStorage) and not isinstance(memory.backend, CpuStorage)
    assert isinstance(cpu.backend, CpuStorage) and isinstance(disk.backend, DiskStorage)
    assert memory.steps(0) == cpu.steps(0) == disk.steps(0)
    for name in NAMES:
        assert torch.equal(memory[name], cpu[name]) and torch.equal(memory[name], disk[name])
    assert disk.nbytes() == 0 and memory.nbytes() == cpu.nbytes() > 0
    assert memory["sampler.hook_entropy"].shape[-1] == 2  # the positions filter applied in every backend


def test_record_spec_validates_and_keywords_override_it(model, ids, tmp_path):
    with pytest.raises(ValueError, match="storage='disk' needs path="):
        RecordSpec(storage="disk")
    with pytest.raises(ValueError, match="path= is where storage='disk' writes"):
        RecordSpec(path=tmp_path)
    with pytest.raises(ValueError, match="storage must be 'memory', 'cpu' or 'disk'"):
        RecordSpec(storage="gpu")
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        RecordSpec(dtype="float16")
    with pytest.raises(TypeError, match="steps must be an int, a slice"):
        RecordSpec(steps="first")
    with pytest.raises(ValueError, match="max_bytes must be a positive int"):
        RecordSpec(max_bytes=0)
    disk = RecordSpec(names_filter="sampler.hook_entropy", storage="disk", path=tmp_path / "never")
    _, cache = model.generate_with_cache(ids, record=disk, storage="memory", steps=[1], max_new_tokens=8, **GEN)
    assert cache.storage == "memory" and cache.steps(0) == [1] and cache.names == ["sampler.hook_entropy"]
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(
    "version, message", [(1, "uses cache format 1"), (None, "uses cache format 0"), ("x", "newer")]
)
def test_other_format_versions_are_refused_with_the_fix(model, ids, tmp_path, version, message):
    model.generate_with_cache(
        ids, names_filter="decoder.hook_embed", storage="disk", path=tmp_path / "c", max_new_tokens=8, **GEN
    )
    meta_path = tmp_path / "c" / "cache.json"
    meta = json.loads(meta_path.read_text())
    assert meta["format_version"] == CACHE_FORMAT_VERSION and meta["record"]["names"] == ["decoder.hook_embed"]
    if version is None:
        del meta["format_version"]
    else:
        meta["format_version"] = version
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=message):
        DenoisingCache.load(tmp_path / "c")
