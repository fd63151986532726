"""The SAE feature panel of the trajectory viewer.

Per chosen SAE feature: its activation at every step and canvas position of the run the viewer shows
(the feature cache `generate_with_sae` records), drawn as one curve across steps per position where it
fires most, with the run's top (step, position) examples and their token context; and, from
`top_activations` over an `ActivationStore`, its top examples in the store (prompt, seed, step,
position, the tokens read and finally written around it) and its mean activation and firing rate per
step. The page marks, at the slider's step, how strongly the selected feature fires at each position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float

from diffusionlens.hooks.shapes import SAE_ACTS_SUFFIX
from diffusionlens.sampling.trace import CanvasTrace
from diffusionlens.viz.html_page import read_asset

if TYPE_CHECKING:
    from diffusionlens.cache.denoising import DenoisingCache
    from diffusionlens.features.sae import FeatureExamples


@dataclass
class FeaturePanel:
    """What the viewer's feature panel shows: `render_viewer(trace, tokenizer, features=FeaturePanel(...))`.

    `hook_name`: the hook the SAE reads. `cache`: the feature cache `generate_with_sae` returned for the
    run whose trace the viewer shows (it holds `hook_name + ".hook_sae_acts_post"`). `examples`:
    `top_activations(sae, store, hook_name)`, with `prompts` (`store.prompts`) to show each example's
    prompt. Give a cache, examples, or both. `features`: the SAE features to show (None: the `top`
    features that fire most strongly in the run, or with the strongest store examples when there is no
    cache). Per feature the chart draws the `curves` positions where it fires most; the `k` positions
    where it fires most are listed, each at the first step it peaks there, with the canvas read at that
    step `context` positions either side.
    """

    hook_name: str
    cache: DenoisingCache | None = None
    examples: FeatureExamples | None = None
    prompts: Sequence[str] | None = None
    features: Sequence[int] | None = None
    top: int = 6
    curves: int = 4
    k: int = 6
    context: int = 3

    def __post_init__(self) -> None:
        if self.cache is None and self.examples is None:
            raise ValueError(
                "a FeaturePanel needs cache= (the feature cache generate_with_sae returns) and/or "
                "examples= (top_activations over a store)"
            )
        if self.cache is not None and not self.cache.recorded_anywhere(self.acts_name):
            raise KeyError(
                f"the cache holds no {self.acts_name!r}; pass the third value generate_with_sae(model, ids, sae, "
                f"{self.hook_name!r}) returns"
            )
        trained_on = None if self.examples is None else self.examples.hook_name
        if trained_on is not None and trained_on != self.hook_name:
            raise ValueError(f"the examples were gathered at {trained_on!r}, not {self.hook_name!r}")
        for name in ("top", "curves", "k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.context < 0:
            raise ValueError(f"context must be >= 0 positions either side, got {self.context}")

    @property
    def acts_name(self) -> str:
        return self.hook_name + SAE_ACTS_SUFFIX


def _round(value: float | torch.Tensor) -> float | None:
    value = float(value)
    return round(value, 4) if value == value and abs(value) != float("inf") else None


def _run_activations(
    panel: FeaturePanel, trace: CanvasTrace, canvas: int, row: int, n_steps: int
) -> tuple[dict[int, torch.Tensor], list[int], int]:
    """Per recorded step (< n_steps): the row's `[pos, d_sae]` activations (NaN at positions not
    recorded); the recorded positions; d_sae."""
    cache = panel.cache
    assert cache is not None
    if canvas not in cache.canvases():
        raise ValueError(f"the feature cache recorded canvases {cache.canvases()}; the viewer shows canvas {canvas}")
    ran, length = trace.input_canvas.shape[0], trace.input_canvas.shape[-1]
    steps = cache.steps(canvas)
    if steps and steps[-1] >= ran:
        raise ValueError(
            f"the feature cache has step {steps[-1]} but the trace ran {ran} steps: record both in the same run"
        )
    per_step: dict[int, torch.Tensor] = {}
    positions: list[int] = []
    d_sae = 0
    for step in steps:
        if step >= n_steps:
            continue
        try:
            value = cache.get(panel.acts_name, canvas=canvas, step=step)
        except KeyError:
            continue  # the SAE was spliced only at some steps
        if not 0 <= row < value.shape[0]:
            raise IndexError(f"row {row} out of range: the feature cache has batch size {value.shape[0]}")
        positions = cache.positions if cache.positions is not None else list(range(value.shape[1]))
        if len(positions) != value.shape[1] or max(positions) >= length:
            raise ValueError(
                f"the feature cache holds {value.shape[1]} positions of a canvas of {length}: record it in the run "
                "the viewer shows"
            )
        full = torch.full((length, value.shape[-1]), float("nan"))
        full[positions] = value[row].detach().float().cpu()
        per_step[step], d_sae = full, value.shape[-1]
    if not per_step:
        raise ValueError(f"the feature cache holds no {panel.acts_name!r} at the steps row {row} ran (< {n_steps})")
    return per_step, positions, d_sae


def _choose(panel: FeaturePanel, run_max: Float[torch.Tensor, " d_sae"] | None, d_sae: int | None) -> list[int]:
    examples = panel.examples
    if panel.features is not None:
        chosen = [int(f) for f in panel.features]
        if d_sae is not None and any(not 0 <= f < d_sae for f in chosen):
            raise IndexError(f"features {chosen} out of range: the SAE has d_sae={d_sae} features")
        if examples is not None:
            missing = [f for f in chosen if f not in examples.features]
            if missing:
                raise ValueError(
                    f"features {missing} are not among the examples' features; run top_activations(..., "
                    f"features={chosen}) or leave features=None there"
                )
        return chosen
    candidates = list(range(d_sae)) if examples is None else list(examples.features)
    if run_max is not None:
        strength = run_max[torch.tensor(candidates)]
        order = strength.argsort(descending=True, stable=True)[: panel.top]
        chosen = [candidates[int(i)] for i in order if float(strength[i]) > 0]
        if not chosen:
            raise ValueError("no SAE feature fires in this run at the recorded steps; pass features=[...]")
        return chosen
    assert examples is not None
    order = examples.values[:, 0].argsort(descending=True, stable=True)[: panel.top]
    return [candidates[int(i)] for i in order]


def feature_panel_data(
    panel: FeaturePanel, trace: CanvasTrace, *, canvas: int, row: int, n_steps: int
) -> tuple[dict[str, Any], set[int]]:
    """The panel's JSON-ready data for one canvas and row of `trace` (its first `n_steps` steps), and the
    token ids whose text the page needs."""
    ids: set[int] = set()
    per_step: dict[int, torch.Tensor] = {}
    run_max = d_sae = None
    if panel.cache is not None:
        per_step, _, d_sae = _run_activations(panel, trace, canvas, row, n_steps)
        run_max = torch.stack([a.nan_to_num(0.0).amax(0) for a in per_step.values()]).amax(0)
    chosen = _choose(panel, run_max, d_sae)
    if panel.examples is not None and panel.prompts is not None:
        used = int(panel.examples.labels["prompt_id"].max()) if panel.examples.labels else -1
        if used >= len(panel.prompts):
            raise ValueError(
                f"the examples name prompt id {used} but prompts has {len(panel.prompts)}: pass store.prompts"
            )
    items = []
    for feature in chosen:
        item: dict[str, Any] = {"feature": feature, "run": None, "store": None}
        if per_step:
            item["run"] = _run_item(panel, trace, row, n_steps, per_step, feature, ids)
        if panel.examples is not None:
            item["store"] = _store_item(panel, feature, ids)
        items.append(item)
    data = {"title": f"SAE features at {panel.hook_name}", "hook": panel.hook_name, "items": items}
    return data, ids


def _run_item(
    panel: FeaturePanel,
    trace: CanvasTrace,
    row: int,
    n_steps: int,
    per_step: dict[int, torch.Tensor],
    feature: int,
    ids: set[int],
) -> dict[str, Any]:
    length = trace.input_canvas.shape[-1]
    acts = torch.full((n_steps, length), float("nan"))
    for step, value in per_step.items():
        acts[step] = value[:, feature]
    filled = acts.nan_to_num(0.0)
    peak = filled.amax(0)  # [pos]
    peak_step = (filled == peak).float().argmax(0)  # the first step at which each position peaks
    firing = [int(p) for p in peak.argsort(descending=True, stable=True) if float(peak[p]) > 0]
    examples = []
    w = panel.context
    for position in firing[: panel.k]:
        step, value = int(peak_step[position]), float(peak[position])
        canvas_read = trace.input_canvas[step, row].tolist()
        context = [canvas_read[p] if 0 <= p < length else None for p in range(position - w, position + w + 1)]
        ids.update(t for t in context if t is not None)
        examples.append({"value": _round(value), "step": step, "position": position, "context": context})
    return {
        "acts": [[_round(v) for v in step] for step in acts.tolist()],
        "max": _round(peak.max()),
        "curve_positions": firing[: panel.curves],
        "n_firing": len(firing),
        "examples": examples,
    }


def _store_item(panel: FeaturePanel, feature: int, ids: set[int]) -> dict[str, Any]:
    examples = panel.examples
    assert examples is not None
    i = examples.features.index(feature)
    rows = []
    for j in range(examples.values.shape[1]):
        if int(examples.rows[i, j]) < 0:
            break
        label = {name: int(v[i, j]) for name, v in examples.labels.items()}
        contexts = {
            name: [None if t < 0 else t for t in examples.context[name][i, j].tolist()] if examples.context else []
            for name in ("input_token", "final_token")
        }
        for context in contexts.values():
            ids.update(t for t in context if t is not None)
        ids.update((label["input_token"], label["final_token"]))
        prompt = None if panel.prompts is None else panel.prompts[label["prompt_id"]]
        rows.append(
            {
                "value": _round(examples.values[i, j]),
                "prompt": prompt,
                **label,
                "context_input": contexts["input_token"],
                "context_final": contexts["final_token"],
            }
        )
    return {
        "mean_by_step": [_round(v) for v in examples.mean_by_step[i].tolist()],
        "fire_rate_by_step": [_round(v) for v in examples.fire_rate_by_step[i].tolist()],
        "context_width": examples.context_width,
        "examples": rows,
    }


FEATURES_HTML = read_asset("features.html")

FEATURES_STYLE = read_asset("features.css")

# Runs inside the viewer's script (it uses `data`, `cells`, `el`, `fmt`, `text` and `go` from there).
FEATURES_SCRIPT = read_asset("features.js")
