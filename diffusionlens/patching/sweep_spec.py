"""Patch sweeps described in a small JSON or YAML file, for `diffusionlens patch SPEC`.

A spec names the model, the clean and corrupted prompts, the hook, the two axes and the metric;
token arguments of metrics are given as text and tokenised with the model's tokenizer::

    {
      "model": "toy",
      "clean": "squares 400 800:",
      "corrupted": "squares 600 800:",
      "hook": "decoder.blocks.{layer}.hook_resid_pre",
      "over": ["step", "position"],
      "layers": [2],
      "positions": {"start": 0, "stop": 12},
      "metric": {"kind": "logit_diff", "position": 0, "good": "8", "bad": "4"},
      "metric_steps": "cell",
      "seed": 0
    }
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from diffusionlens.patching.metrics import KLToClean, LogitDiff, TargetProb
from diffusionlens.patching.runs import PatchedRun, record_run
from diffusionlens.patching.sweep import SweepResult, patch_sweep

METRIC_KINDS = ("logit_diff", "target_prob", "kl_to_clean")


@dataclass
class SweepSpec:
    """A parsed sweep spec; see the module docstring for the file format."""

    clean: str
    corrupted: str
    hook: str
    over: tuple[str, str]
    metric: dict[str, Any]
    model: str = "toy"
    mode: str = "frozen"
    layers: list[int] | None = None
    steps: list[int] | None = None
    positions: list[int] | None = None
    metric_steps: Any = None
    seed: int = 0
    max_new_tokens: int | None = None
    path: str = "fast"  # "reference": one run_patched per cell (see patch_sweep)
    batch_size: int | None = None
    source: str = field(default="<dict>", repr=False)  # where the spec came from, for error messages

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<dict>") -> SweepSpec:
        keys = {f.name for f in fields(cls)} - {"source"}
        unknown = sorted(set(raw) - keys)
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown}; a sweep spec may hold {sorted(keys)}")
        missing = [k for k in ("clean", "corrupted", "hook", "over", "metric") if k not in raw]
        if missing:
            raise ValueError(f"{source}: missing {missing}; see `diffusionlens patch --help` for an example spec")
        if len(raw["over"]) != 2:
            raise ValueError(f"{source}: 'over' needs two axes, e.g. ['step', 'position'], got {raw['over']!r}")
        kind = raw["metric"].get("kind")
        if kind not in METRIC_KINDS:
            raise ValueError(f"{source}: metric kind {kind!r} is not one of {METRIC_KINDS}")
        ranges = {k: _as_list(raw.get(k), k, source) for k in ("layers", "steps", "positions")}
        rest = {
            k: raw[k]
            for k in ("model", "mode", "metric_steps", "seed", "max_new_tokens", "path", "batch_size")
            if k in raw
        }
        return cls(
            clean=raw["clean"],
            corrupted=raw["corrupted"],
            hook=raw["hook"],
            over=tuple(raw["over"]),
            metric=dict(raw["metric"]),
            source=source,
            **ranges,
            **rest,
        )

    @classmethod
    def load(cls, path: str | Path) -> SweepSpec:
        """Read a `.json`, `.yaml` or `.yml` spec file."""
        path = Path(path)
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a sweep spec is a mapping of keys to values, got {type(raw).__name__}")
        return cls.from_dict(raw, source=str(path))


def _as_list(value: Any, key: str, source: str) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, dict):
        extra = set(value) - {"start", "stop", "step"}
        if extra or "stop" not in value:
            raise ValueError(f"{source}: {key} as a range is {{'start': 0, 'stop': 12}}, got {value!r}")
        return list(range(value.get("start", 0), value["stop"], value.get("step", 1)))
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _token_id(tokenizer, text: Any, source: str) -> int:
    if isinstance(text, int):
        return text
    ids = tokenizer(str(text), add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{source}: metric token {text!r} is {len(ids)} tokens; give a single token (or its id)")
    return ids[0]


def build_metric(spec: SweepSpec, tokenizer, clean: PatchedRun):
    """The metric object a spec names, with token texts turned into ids."""
    m = dict(spec.metric)
    kind = m.pop("kind")
    step = m.pop("step", -1)
    try:
        if kind == "logit_diff":
            good, bad = (_token_id(tokenizer, m.pop(k), spec.source) for k in ("good", "bad"))
            return LogitDiff(position=m.pop("position"), good=good, bad=bad, step=step, **m)
        if kind == "target_prob":
            token = _token_id(tokenizer, m.pop("token"), spec.source)
            return TargetProb(position=m.pop("position"), token=token, step=step, **m)
        return KLToClean(clean=clean, step=step, **m)
    except (KeyError, TypeError) as error:
        raise ValueError(f"{spec.source}: metric {spec.metric!r} does not fit {kind}: {error}") from None


def record_spec_runs(spec: SweepSpec, model) -> tuple[PatchedRun, PatchedRun, Any]:
    """`(clean, corrupted, metric)` for a spec: both runs recorded with `ReplayNoise(spec.seed)` (the clean one
    keeping the spec's hook at its layers), the metric built against the clean run. The single-process and
    the distributed sweep both start here, so they patch the same runs."""
    from diffusionlens.sampling.noise import ReplayNoise

    layers = spec.layers if spec.layers is not None else range(model.cfg.num_hidden_layers)
    names = sorted({spec.hook.format(layer=layer) for layer in layers})
    settings = {"max_new_tokens": spec.max_new_tokens or model.cfg.canvas_length}
    clean_ids, corrupted_ids = model.to_tokens(spec.clean), model.to_tokens(spec.corrupted)
    clean = record_run(model, clean_ids, names_filter=names, noise=ReplayNoise(spec.seed), **settings)
    corrupted = record_run(model, corrupted_ids, noise=ReplayNoise(spec.seed), **settings)
    return clean, corrupted, build_metric(spec, model.tokenizer, clean)


def sweep_recorded_spec(
    spec: SweepSpec,
    model,
    runs: tuple[PatchedRun, PatchedRun, Any],
    *,
    first_axis_labels: list | None = None,
    progress: bool = True,
) -> SweepResult:
    """`patch_sweep` as the spec describes it, on `runs` from `record_spec_runs`. `first_axis_labels`
    narrows the first axis (`spec.over[0]`, layer or step) to those labels: one distributed task's row."""
    clean, corrupted, metric = runs
    ranges = {"layers": spec.layers, "steps": spec.steps, "positions": spec.positions}
    if first_axis_labels is not None:
        ranges[{"layer": "layers", "step": "steps"}[spec.over[0]]] = first_axis_labels
    return patch_sweep(
        model,
        clean,
        corrupted,
        spec.hook,
        spec.over,
        metric,
        mode=spec.mode,
        metric_steps=spec.metric_steps,
        progress=progress,
        path=spec.path,
        batch_size=spec.batch_size,
        **ranges,
    )


def run_sweep_spec(spec: SweepSpec, model=None, progress: bool = True) -> SweepResult:
    """Record the clean and corrupted runs with `ReplayNoise(spec.seed)` and run the sweep."""
    from diffusionlens.model import HookedDiffusionGemma

    model = model or HookedDiffusionGemma.from_pretrained(spec.model, progress=progress)
    result = sweep_recorded_spec(spec, model, record_spec_runs(spec, model), progress=progress)
    result.metadata.update({"clean": spec.clean, "corrupted": spec.corrupted, "model": spec.model})
    return result
