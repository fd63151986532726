"""Property tests (hypothesis) of what is read back or checked up front: sweep specs round-trip through
`to_dict`, JSON and YAML, and a broken one is refused by `diffusionlens patch` with a one-line error before
any model loads; a `Patch`'s selectors are checked against the model before a run; a disk cache reloads
equal to the run it recorded, whatever was recorded, and any tampering with it is refused."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import CANVAS
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffusionlens import CacheIntegrityError, DenoisingCache, HookedDiffusionGemma, ReplayNoise
from diffusionlens.cli import main
from diffusionlens.patching import Patch
from diffusionlens.patching.sweep_spec import SpecError, SweepSpec, check_before_load

TOY_LAYERS, TOY_CANVAS, TOY_HEADS = 6, 48, 4  # checked against the toy's config below
SLOW = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def test_the_toy_sizes_these_strategies_assume(toy):
    assert (toy.cfg.num_hidden_layers, toy.cfg.canvas_length, toy.cfg.num_attention_heads) == (
        TOY_LAYERS,
        TOY_CANVAS,
        TOY_HEADS,
    )


# ---------------------------------------------------------------------- sweep specs
def axis_values(limit: int):
    """An axis as a spec writes it: an int, a list of distinct ints, or a {start, stop, step} range."""
    as_list = st.lists(st.integers(0, limit - 1), min_size=1, max_size=6, unique=True)
    as_range = st.tuples(st.integers(0, limit - 1), st.integers(1, 4)).map(
        lambda start_step: {"start": start_step[0], "stop": limit, "step": start_step[1]}
    )
    return st.one_of(st.integers(0, limit - 1), as_list, as_range)


tokens = st.one_of(st.sampled_from(["8", "4", "7", "1"]), st.integers(0, 40))
metrics = st.one_of(
    st.fixed_dictionaries(
        {"kind": st.just("logit_diff"), "position": st.integers(0, TOY_CANVAS - 1), "good": tokens, "bad": tokens},
        optional={"step": st.integers(-48, 47), "canvas": st.just(0)},
    ),
    st.fixed_dictionaries(
        {"kind": st.just("target_prob"), "position": st.integers(0, TOY_CANVAS - 1), "token": tokens},
        optional={"step": st.integers(-48, 47)},
    ),
    st.fixed_dictionaries({"kind": st.just("kl_to_clean")}, optional={"step": st.integers(-48, 47)}),
)


@st.composite
def valid_specs(draw) -> dict:
    over = draw(st.sampled_from([["layer", "position"], ["step", "position"], ["layer", "step"], ["layer", "head"]]))
    raw = {
        "clean": draw(st.text(min_size=1, max_size=20)),
        "corrupted": draw(st.text(min_size=1, max_size=20)),
        "over": over,
        "metric": draw(metrics),
        "model": "toy",
    }
    if "layer" in over:
        raw["hook"] = "decoder.blocks.{layer}.hook_resid_pre"
        if draw(st.booleans()):
            raw["layers"] = draw(axis_values(TOY_LAYERS))
    else:
        raw["hook"] = "decoder.blocks.{layer}.hook_attn_out"
        raw["layers"] = [draw(st.integers(0, TOY_LAYERS - 1))]
    for axis, key, limit in (("step", "steps", 48), ("position", "positions", TOY_CANVAS)):
        if axis in over and draw(st.booleans()):
            raw[key] = draw(axis_values(limit))
    raw["mode"] = draw(st.sampled_from(["frozen", "free"]))
    if "step" in over and raw["mode"] == "frozen" and draw(st.booleans()):
        raw["metric_steps"] = "cell"
    elif draw(st.booleans()):
        raw["metric_steps"] = draw(st.lists(st.integers(0, 47), min_size=1, max_size=3))
    for key, values in (
        ("seed", st.integers(0, 2**31)),
        ("max_new_tokens", st.integers(1, 48)),
        ("path", st.sampled_from(["fast", "reference"])),
        ("batch_size", st.integers(1, 64)),
    ):
        if draw(st.booleans()):
            raw[key] = draw(values)
    return raw


@settings(max_examples=50, deadline=None)
@given(raw=valid_specs())
def test_valid_specs_round_trip_through_to_dict_json_and_yaml(raw):
    spec = SweepSpec.from_dict(raw)
    assert check_before_load(spec)  # and fit the toy: nothing valid is refused
    assert SweepSpec.from_dict(spec.to_dict()) == spec
    assert SweepSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert SweepSpec.from_dict(yaml.safe_load(yaml.safe_dump(spec.to_dict()))) == spec
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "spec.yaml"
        path.write_text(yaml.safe_dump(spec.to_dict()))
        assert replace(SweepSpec.load(path), source="<dict>") == spec
    # ranges are written out as lists, so the dict is plain data
    assert all(isinstance(spec.to_dict()[k], list) for k in ("layers", "steps", "positions") if k in spec.to_dict())


def positions_or_layers(raw: dict) -> str:
    return "positions" if "position" in raw["over"] else "layers"


# (how to break a valid spec, what the one-line error must say)
BREAKAGES = {
    "unknown key": (lambda raw: {**raw, "colour": "red"}, "unknown keys \\['colour'\\]"),
    "missing hook": (lambda raw: {k: v for k, v in raw.items() if k != "hook"}, "missing \\['hook'\\]"),
    "three axes": (lambda raw: {**raw, "over": ["layer", "step", "position"]}, "'over' needs two axes"),
    "no such sweep": (lambda raw: {**raw, "over": ["position", "layer"]}, "is not a sweep"),
    "seed as text": (lambda raw: {**raw, "seed": "0"}, "seed must be an integer"),
    "bool batch": (lambda raw: {**raw, "batch_size": True}, "batch_size must be a positive integer"),
    "mode": (lambda raw: {**raw, "mode": "thawed"}, "mode='thawed'; choose one of"),
    "metric kind": (lambda raw: {**raw, "metric": {**raw["metric"], "kind": "logit_sum"}}, "metric kind 'logit_sum'"),
    "metric position as text": (
        lambda raw: {**raw, "metric": {"kind": "target_prob", "position": "0", "token": 1}},
        "metric position must be an integer",
    ),
    "empty clean": (lambda raw: {**raw, "clean": ""}, "clean must be a non-empty string"),
    "negative axis": (lambda raw: {**raw, positions_or_layers(raw): [3, -1]}, "must be >= 0, got -1"),
    "empty axis": (lambda raw: {**raw, positions_or_layers(raw): []}, "is empty"),
    "twice": (lambda raw: {**raw, positions_or_layers(raw): [2, 2]}, "lists a value twice"),
    "huge range": (
        lambda raw: {**raw, positions_or_layers(raw): {"start": 0, "stop": 10**12}},
        "has 1,000,000,000,000 values.*narrow it",
    ),
    "past the model": (lambda raw: {**raw, positions_or_layers(raw): [1, 999]}, "\\[999\\] out of range"),
    "metric position past the canvas": (
        lambda raw: {**raw, "metric": {"kind": "target_prob", "position": 999, "token": 1}},
        "metric position 999 is out of range",
    ),
}


@SLOW
@given(raw=valid_specs(), breakage=st.sampled_from(sorted(BREAKAGES)))
def test_broken_specs_are_refused_in_one_line_before_the_model_loads(raw, breakage, monkeypatch, capsys):
    break_it, message = BREAKAGES[breakage]

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded for a spec that cannot run")

    monkeypatch.setattr(HookedDiffusionGemma, "from_pretrained", no_load)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "spec.json"
        path.write_text(json.dumps(break_it(raw)))
        with pytest.raises(SystemExit) as exit_info:
            main(["patch", str(path), "--out", str(Path(folder) / "out"), "--no-progress"])
        assert not (Path(folder) / "out").exists()
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert re.search(message, error), (breakage, error)
    with pytest.raises(SpecError):  # the same spec from Python, before any model work
        check_before_load(SweepSpec.from_dict(break_it(raw)))


# ---------------------------------------------------------------------- patches
# ints and lists (slices have their own rules, tested against Python's in tests/unit/test_selectors.py)
selectors = st.one_of(st.integers(-100, 100), st.lists(st.integers(-100, 100), min_size=1, max_size=4))


def fits(selector, size: int) -> bool:
    """Whether every index `selector` names lies on an axis of `size` (negative ones count from its end)."""
    values = selector if isinstance(selector, list) else [selector]
    return all(-size <= v < size for v in values)


@settings(max_examples=60, deadline=None)
@given(positions=selectors, steps=selectors)
def test_a_patch_is_checked_against_the_model_before_any_run(toy, positions, steps):
    patch = Patch("decoder.blocks.2.hook_resid_post", torch.zeros(1), steps=steps, positions=positions)
    max_steps = 12
    if fits(positions, TOY_CANVAS) and fits(steps, max_steps):
        ((name, _),) = patch.hooks(toy, max_steps)
        assert name == "decoder.blocks.2.hook_resid_post"
        return
    with pytest.raises((ValueError, IndexError)) as error:
        patch.hooks(toy, max_steps)
    bad = "steps" if not fits(steps, max_steps) else "positions"  # steps are checked first
    assert bad in str(error.value), str(error.value)


# ---------------------------------------------------------------------- disk caches
NAMES = [
    "encoder.hook_embed",
    "decoder.blocks.0.hook_attn_out",
    "decoder.blocks.1.hook_resid_post",
    "sampler.hook_entropy",
]
GEN = dict(max_denoising_steps=4, noise=ReplayNoise(4), progress=False, eos_token_id=None)


@SLOW
@given(
    names=st.lists(st.sampled_from(NAMES), min_size=1, max_size=4, unique=True),
    steps=st.one_of(st.none(), st.lists(st.integers(0, 3), min_size=1, max_size=4, unique=True)),
    positions=st.one_of(st.none(), st.integers(0, CANVAS["mixed"] - 1), st.just(slice(1, 3))),
    dtype=st.sampled_from([None, torch.float16]),
)
def test_a_disk_cache_reloads_equal_to_the_run_it_recorded(model, ids, names, steps, positions, dtype):
    record = dict(names_filter=names, steps=steps, positions=positions, dtype=dtype, **GEN)
    _, memory = model.generate_with_cache(ids, max_new_tokens=CANVAS["mixed"], **record)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c"
        model.generate_with_cache(ids, max_new_tokens=CANVAS["mixed"], storage="disk", path=path, **record)
        disk = DenoisingCache.load(path)
        assert disk.complete and sorted(disk.names) == sorted(memory.names)
        assert disk.canvases() == memory.canvases()
        for canvas in memory.canvases():
            assert disk.steps(canvas) == memory.steps(canvas)
            for name in memory.names:
                for step in [None] if name.startswith("encoder.") else memory.steps(canvas):
                    assert torch.equal(disk.get(name, canvas, step), memory.get(name, canvas, step)), (name, step)


@pytest.fixture(scope="module")
def written(model, ids, tmp_path_factory):
    path = tmp_path_factory.mktemp("written") / "cache"
    model.generate_with_cache(ids, names_filter=NAMES, max_new_tokens=CANVAS["mixed"], storage="disk", path=path, **GEN)
    return path


def shard_edit(edit):
    """Rewrite a shard through `edit(tensors)`, keeping the canvas/step metadata it was written with."""

    def tamper(path: Path, shard: str, other: str) -> None:
        tensors = load_file(str(path / shard))
        with safe_open(str(path / shard), framework="pt") as handle:
            metadata = handle.metadata()
        edit(tensors)
        save_file(tensors, str(path / shard), metadata=metadata)

    return tamper


def swap(path: Path, shard: str, other: str) -> None:
    (path / shard).rename(path / "swap")
    (path / other).rename(path / shard)
    (path / "swap").rename(path / other)


def edit_manifest_line(path: Path, shard: str, other: str) -> None:
    lines = (path / "manifest.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    entry = next(e for e in entries if e["file"] == shard)
    entry["bytes"] += 1
    (path / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))


def first_tensor(tensors: dict) -> str:
    return sorted(tensors)[0]


TAMPERING = {
    "delete": lambda path, shard, other: (path / shard).unlink(),
    "truncate": lambda path, shard, other: (path / shard).write_bytes((path / shard).read_bytes()[:-7]),
    "swap": swap,
    "another dtype": shard_edit(lambda t: t.update({first_tensor(t): t[first_tensor(t)].double()})),
    "another shape": shard_edit(lambda t: t.update({first_tensor(t): t[first_tensor(t)].unsqueeze(0)})),
    "injected tensor": shard_edit(lambda t: t.update({"decoder.blocks.0.hook_mlp_out": t[first_tensor(t)].clone()})),
    "dropped tensor": shard_edit(lambda t: t.pop(first_tensor(t)) if len(t) > 1 else t.clear()),
    "manifest edited": edit_manifest_line,
    "marker removed": lambda path, shard, other: (path / "complete.json").unlink(),
    "extra shard": lambda path, shard, other: shutil.copy(path / shard, path / "canvas0009_step0009.safetensors"),
}


@SLOW
@given(tampering=st.sampled_from(sorted(TAMPERING)), data=st.data())
def test_any_tampering_with_a_disk_cache_is_refused(written, tampering, data):
    shards = sorted(p.name for p in written.glob("canvas*.safetensors"))
    shard = data.draw(st.sampled_from(shards), label="shard")
    other = data.draw(st.sampled_from([s for s in shards if s != shard]), label="other")
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / "cache"
        shutil.copytree(written, copy)
        TAMPERING[tampering](copy, shard, other)
        with pytest.raises(CacheIntegrityError, match="record the run again|allow_partial"):
            DenoisingCache.load(copy)
