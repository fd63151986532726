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
from diffusionlens.patching.sweep import AXES, SweepResult, patch_sweep
from diffusionlens.sampling.settings import GenerationSettings

METRIC_KINDS = ("logit_diff", "target_prob", "kl_to_clean")
MODES = ("frozen", "free")
PATHS = ("fast", "reference")
# Keys each metric kind takes (besides `kind`), and which of them it needs.
_METRIC_KEYS = {
    "logit_diff": ({"position", "good", "bad", "step", "canvas"}, ("position", "good", "bad")),
    "target_prob": ({"position", "token", "step", "canvas"}, ("position", "token")),
    "kl_to_clean": ({"step", "canvas"}, ()),
}
# An axis longer than this cannot be right for any model (no axis of a sweep has this many labels); a range
# is measured with len(range(...)) before anything is built, so a 10**12-value range costs nothing to refuse.
MAX_AXIS_LABELS = 1 << 20
_AXIS_KEYS = {"layer": "layers", "step": "steps", "position": "positions"}


class SpecError(ValueError):
    """A sweep spec that cannot run; the message is one line naming the key, the bad value and the fix."""


@dataclass
class SweepSpec:
    """A parsed sweep spec; see the module docstring for the file format.

    `from_dict` (and so `load`) checks the whole spec against its schema (keys, types, sizes of ranges);
    `check_config` checks it against a model's config (layers, positions, steps, metric position and
    canvas, hook names); `check_runs` against the recorded runs (steps they actually ran). Each raises
    a `SpecError` before the work it guards.
    """

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
        """Check `raw` against the spec schema and build the spec; a `SpecError` names the first problem."""
        if not isinstance(raw, dict):
            raise SpecError(f"{source}: a sweep spec is a mapping of keys to values, got {type(raw).__name__}")
        keys = {f.name for f in fields(cls)} - {"source"}
        unknown = sorted(set(raw) - keys, key=str)
        if unknown:
            raise SpecError(f"{source}: unknown keys {unknown}; a sweep spec may hold {sorted(keys)}")
        missing = [k for k in ("clean", "corrupted", "hook", "over", "metric") if k not in raw]
        if missing:
            raise SpecError(f"{source}: missing {missing}; see `diffusionlens patch --help` for an example spec")
        for key in ("clean", "corrupted", "hook", "model"):
            if key in raw and (not isinstance(raw[key], str) or not raw[key]):
                raise SpecError(f"{source}: {key} must be a non-empty string, got {raw[key]!r}")
        over = raw["over"]
        if not isinstance(over, list | tuple) or len(over) != 2:
            raise SpecError(f"{source}: 'over' needs two axes, e.g. ['step', 'position'], got {over!r}")
        if tuple(over) not in AXES:
            raise SpecError(f"{source}: over={list(over)!r} is not a sweep; choose one of {sorted(map(list, AXES))}")
        for key, choices in (("mode", MODES), ("path", PATHS)):
            if key in raw and raw[key] not in choices:
                raise SpecError(f"{source}: {key}={raw[key]!r}; choose one of {list(choices)}")
        if "seed" in raw and not _is_int(raw["seed"]):
            raise SpecError(f"{source}: seed must be an integer, got {raw['seed']!r}")
        for key in ("max_new_tokens", "batch_size"):
            if raw.get(key) is not None and (not _is_int(raw[key]) or raw[key] < 1):
                raise SpecError(f"{source}: {key} must be a positive integer (or absent), got {raw[key]!r}")
        metric = _checked_metric(raw["metric"], source)
        ranges = {k: _as_list(raw.get(k), k, source) for k in ("layers", "steps", "positions")}
        for axis, key in _AXIS_KEYS.items():
            used = axis in over or (key == "layers" and "{layer}" in raw["hook"])
            if ranges[key] is not None and not used:
                raise SpecError(f"{source}: {key} is given but the sweep is over {list(over)}; drop it")
        if "layer" in over and "{layer}" not in raw["hook"]:
            raise SpecError(
                f"{source}: sweeping over layers needs '{{layer}}' in the hook, e.g. 'decoder.blocks.{{layer}}.…'"
            )
        if (
            "{layer}" in raw["hook"]
            and "layer" not in over
            and (ranges["layers"] is None or len(ranges["layers"]) != 1)
        ):
            raise SpecError(
                f"{source}: the hook {raw['hook']!r} has a {{layer}} but the sweep is over {list(over)}: "
                "give the one layer to patch, e.g. layers: [2]"
            )
        metric_steps = _checked_metric_steps(raw.get("metric_steps"), raw, source)
        rest = {k: raw[k] for k in ("model", "mode", "seed", "max_new_tokens", "path", "batch_size") if k in raw}
        return cls(
            clean=raw["clean"],
            corrupted=raw["corrupted"],
            hook=raw["hook"],
            over=tuple(over),
            metric=metric,
            metric_steps=metric_steps,
            source=source,
            **ranges,
            **rest,
        )

    def to_dict(self) -> dict[str, Any]:
        """The spec as `from_dict` reads it, fields that are None left out:
        `SweepSpec.from_dict(spec.to_dict()) == spec`, also through JSON or YAML."""
        raw = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "source"}
        raw["over"] = list(self.over)
        raw["metric"] = dict(self.metric)
        raw = {key: list(value) if isinstance(value, list) else value for key, value in raw.items()}
        return {key: value for key, value in raw.items() if value is not None}

    @classmethod
    def load(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> SweepSpec:
        """Read a `.json`, `.yaml` or `.yml` spec file, with `overrides` replacing its keys (the command
        line's --model, --reference); any problem is a one-line `SpecError` (an OSError for a file that
        cannot be read)."""
        path = Path(path)
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            try:
                raw = yaml.safe_load(text)
            except yaml.YAMLError as error:
                mark = getattr(error, "problem_mark", None)
                where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
                problem = getattr(error, "problem", None) or str(error).splitlines()[0]
                raise SpecError(f"{path}: not valid YAML{where}: {problem}; fix the file") from None
        else:
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as error:
                raise SpecError(f"{path}: not valid JSON: {error}; fix the file") from None
        if isinstance(raw, dict) and overrides:
            raw = {**raw, **overrides}
        return cls.from_dict(raw, source=str(path))

    def check_config(self, cfg: Any, tokenizer: Any = None, hook_names: Any = None) -> None:
        """Check the spec against a model's config (known before its weights load): layers, steps,
        positions, the metric's position, step and canvas, `metric_steps`; with `tokenizer`, the metric's
        tokens (one token each, inside the vocabulary); with `hook_names` (a callable resolving a name or
        pattern, e.g. a model's `resolve_hook_names`), the hook at every layer."""
        src = self.source
        max_steps = GenerationSettings.max_denoising_steps
        n_canvases = -(-(self.max_new_tokens or cfg.canvas_length) // cfg.canvas_length)
        limits = {"layers": cfg.num_hidden_layers, "steps": max_steps}
        why = {"layers": "the model's layers", "steps": "denoising steps (max_denoising_steps)"}
        if not self.hook.startswith("encoder."):  # encoder positions index the prompt, checked on the runs
            limits["positions"] = cfg.canvas_length
            why["positions"] = "canvas positions (canvas_length)"
        for key, limit in limits.items():
            values = getattr(self, key)
            bad = [v for v in values or () if not 0 <= v < limit]
            if bad:
                raise SpecError(
                    f"{src}: {key} {bad[:5]} out of range: the model has {limit} {why[key]}, 0..{limit - 1}"
                )
        m = self.metric
        if "position" in m and not 0 <= m["position"] < cfg.canvas_length:
            raise SpecError(
                f"{src}: metric position {m['position']} is out of range: the canvas has {cfg.canvas_length} "
                f"positions, 0..{cfg.canvas_length - 1}"
            )
        step = m.get("step", -1)
        if not -max_steps <= step < max_steps:
            raise SpecError(
                f"{src}: metric step {step} is out of range: a canvas runs at most {max_steps} steps, "
                f"so use 0..{max_steps - 1} or -{max_steps}..-1 (counting from the run's last step)"
            )
        if not 0 <= m.get("canvas", 0) < n_canvases:
            raise SpecError(
                f"{src}: metric canvas {m['canvas']} is out of range: the runs write {n_canvases} canvas(es) "
                f"(max_new_tokens / canvas_length), 0..{n_canvases - 1}"
            )
        if isinstance(self.metric_steps, list):
            bad = [s for s in self.metric_steps if not 0 <= s < max_steps]
            if bad:
                raise SpecError(f"{src}: metric_steps {bad[:5]} out of range: use 0..{max_steps - 1}")
        if tokenizer is not None:
            for key in ("good", "bad", "token"):
                if key in m:
                    _token_id(tokenizer, m[key], src, cfg.vocab_size)
        if hook_names is not None:
            layers = self.layers if self.layers is not None else range(cfg.num_hidden_layers)
            names = (
                sorted({self.hook.format(layer=layer) for layer in layers}) if "{layer}" in self.hook else [self.hook]
            )
            for name in names:
                try:
                    hook_names(name)
                except KeyError as error:
                    raise SpecError(f"{src}: hook {name!r}: {error.args[0]}") from None

    def check_runs(self, clean: PatchedRun, corrupted: PatchedRun) -> None:
        """Check the spec against the recorded runs, before any patching: steps and metric steps the runs
        did not reach (a run stops when its canvas is stable), and encoder positions past the prompt."""
        src = self.source
        canvas = self.metric.get("canvas", 0)
        for name, run in (("clean", clean), ("corrupted", corrupted)):
            if canvas >= len(run.trace):
                raise SpecError(
                    f"{src}: metric canvas {canvas}: the {name} run stopped after {len(run.trace)} canvas(es)"
                )
        ran = min(clean.trace.steps(0), corrupted.trace.steps(0))
        bad = [s for s in self.steps or () if s >= ran]
        if bad:
            raise SpecError(
                f"{src}: steps {bad[:5]} were not run: the clean and corrupted runs both ran steps 0..{ran - 1} "
                "of their first canvas; sweep those"
            )
        metric_ran = corrupted.trace.steps(canvas)
        step = self.metric.get("step", -1)
        if self.metric_steps != "cell" and not -metric_ran <= step < metric_ran:
            raise SpecError(
                f"{src}: metric step {step} was not run: the corrupted run ran steps 0..{metric_ran - 1} of canvas "
                f"{canvas} (or -{metric_ran}..-1 from its end)"
            )
        bad = (
            [s for s in self.metric_steps if s >= corrupted.trace.steps(0)]
            if isinstance(self.metric_steps, list)
            else []
        )
        if bad:
            raise SpecError(
                f"{src}: metric_steps {bad[:5]} were not run: the corrupted run ran 0..{corrupted.trace.steps(0) - 1}"
            )
        if self.hook.startswith("encoder.") and self.positions is not None:
            prompt = min(clean.input_ids.shape[1], corrupted.input_ids.shape[1])
            bad = [p for p in self.positions if p >= prompt]
            if bad:
                raise SpecError(
                    f"{src}: positions {bad[:5]} are past the prompt ({prompt} tokens) the encoder hook sees"
                )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _checked_metric(metric: Any, source: str) -> dict[str, Any]:
    if not isinstance(metric, dict):
        raise SpecError(
            f"{source}: metric must be a mapping such as {{'kind': 'logit_diff', 'position': 0, 'good': '8', "
            f"'bad': '4'}}, got {metric!r}"
        )
    kind = metric.get("kind")
    if kind not in METRIC_KINDS:
        raise SpecError(f"{source}: metric kind {kind!r} is not one of {METRIC_KINDS}")
    allowed, needed = _METRIC_KEYS[kind]
    unknown = sorted(set(metric) - allowed - {"kind"}, key=str)
    if unknown:
        raise SpecError(f"{source}: metric {kind} takes {sorted(allowed)}, not {unknown}")
    absent = [k for k in needed if k not in metric]
    if absent:
        raise SpecError(f"{source}: metric {kind} needs {absent}")
    for key in ("position", "step", "canvas"):
        if key in metric and not _is_int(metric[key]):
            raise SpecError(f"{source}: metric {key} must be an integer, got {metric[key]!r}")
    for key in ("position", "canvas"):
        if key in metric and metric[key] < 0:
            raise SpecError(f"{source}: metric {key} must be >= 0, got {metric[key]}")
    for key in ("good", "bad", "token"):
        value = metric.get(key)
        if key in metric and not ((_is_int(value) and value >= 0) or (isinstance(value, str) and value)):
            raise SpecError(f"{source}: metric {key} must be a token's text or its id (an integer >= 0), got {value!r}")
    return dict(metric)


def _checked_metric_steps(value: Any, raw: dict[str, Any], source: str) -> Any:
    if value is None:
        return None
    if value == "cell":
        if "step" not in raw["over"] or raw.get("mode", "frozen") != "frozen":
            raise SpecError(f"{source}: metric_steps 'cell' needs a frozen sweep over steps (over: ['step', ...])")
        return value
    steps = [value] if _is_int(value) else value
    if not isinstance(steps, list) or not steps or not all(_is_int(s) and s >= 0 for s in steps):
        raise SpecError(f"{source}: metric_steps must be 'cell', a step >= 0 or a list of them, got {value!r}")
    return list(steps)


def _as_list(value: Any, key: str, source: str) -> list[int] | None:
    """An axis's labels: an int, a list of ints, or {start, stop, step} (sized before it is built)."""
    if value is None:
        return None
    if isinstance(value, dict):
        extra = set(value) - {"start", "stop", "step"}
        if extra or "stop" not in value:
            raise SpecError(f"{source}: {key} as a range is {{'start': 0, 'stop': 12}}, got {value!r}")
        start, stop, step = value.get("start", 0), value["stop"], value.get("step", 1)
        if not all(_is_int(v) for v in (start, stop, step)) or step == 0:
            raise SpecError(f"{source}: {key} range needs integer start, stop and a nonzero step, got {value!r}")
        labels = range(start, stop, step)
    elif _is_int(value):
        labels = [value]
    elif isinstance(value, list) and all(_is_int(v) for v in value):
        labels = value
    else:
        raise SpecError(f"{source}: {key} must be an integer, a list of integers or {{start, stop}}, got {value!r}")
    if len(labels) == 0:
        raise SpecError(f"{source}: {key} is empty ({value!r}); give at least one")
    if len(labels) > MAX_AXIS_LABELS:
        raise SpecError(f"{source}: {key} has {len(labels):,} values; no model has that many {key}: narrow it")
    if min(labels) < 0:
        raise SpecError(f"{source}: {key} must be >= 0, got {min(labels)}")
    if len(set(labels)) != len(labels):
        raise SpecError(f"{source}: {key} lists a value twice ({value!r}); give each once")
    return list(labels)


def _token_id(tokenizer, text: Any, source: str, vocab_size: int | None = None) -> int:
    if _is_int(text):
        token = text
    else:
        if tokenizer is None:
            raise SpecError(f"{source}: metric token {text!r} is text but the model has no tokenizer; give its id")
        ids = tokenizer(str(text), add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise SpecError(f"{source}: metric token {text!r} is {len(ids)} tokens; give a single token (or its id)")
        token = ids[0]
    if vocab_size is not None and not 0 <= token < vocab_size:
        raise SpecError(f"{source}: metric token id {token} is outside the vocabulary [0, {vocab_size})")
    return token


def check_before_load(spec: SweepSpec) -> bool:
    """Check `spec` against its model's config.json, tokenizer and hook names without loading a weight (a
    skeleton of the model is built on the meta device for its hook names). False when the model is not a
    local directory (a hub id): `run_sweep_spec` then checks it right after loading, before generating."""
    import torch

    from diffusionlens.config import DiffusionGemmaConfig
    from diffusionlens.model import HookedDiffusionGemma
    from diffusionlens.weights.checkpoint import SHIPPED_CHECKPOINTS

    directory = SHIPPED_CHECKPOINTS.get(spec.model, Path(spec.model))
    if not directory.exists():
        return False
    if not (directory / "config.json").is_file():
        raise SpecError(f"{spec.source}: model {spec.model!r} is not a checkpoint directory (no config.json in it)")
    try:
        cfg = DiffusionGemmaConfig.from_hf(directory)
    except (ValueError, TypeError, KeyError) as error:
        raise SpecError(f"{spec.source}: model {spec.model!r}: {error}") from None
    tokenizer = None
    if (directory / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    with torch.device("meta"):
        skeleton = HookedDiffusionGemma(cfg)
    spec.check_config(cfg, tokenizer, skeleton.resolve_hook_names)
    return True


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
        raise SpecError(f"{spec.source}: metric {spec.metric!r} does not fit {kind}: {error}") from None


def record_spec_runs(spec: SweepSpec, model) -> tuple[PatchedRun, PatchedRun, Any]:
    """`(clean, corrupted, metric)` for a spec: both runs recorded with `ReplayNoise(spec.seed)` (the clean one
    keeping the spec's hook at its layers), the metric built against the clean run. The single-process and
    the distributed sweep both start here, so they patch the same runs."""
    from diffusionlens.sampling.noise import ReplayNoise

    spec.check_config(model.cfg, model.tokenizer, model.resolve_hook_names)  # cheap; before any generation
    layers = spec.layers if spec.layers is not None else range(model.cfg.num_hidden_layers)
    names = sorted({spec.hook.format(layer=layer) for layer in layers})
    settings = {"max_new_tokens": spec.max_new_tokens or model.cfg.canvas_length}
    clean_ids, corrupted_ids = model.to_tokens(spec.clean), model.to_tokens(spec.corrupted)
    clean = record_run(model, clean_ids, names_filter=names, noise=ReplayNoise(spec.seed), **settings)
    corrupted = record_run(model, corrupted_ids, noise=ReplayNoise(spec.seed), **settings)
    spec.check_runs(clean, corrupted)
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
