"""Splicing transcoders into a run: each chosen layer's feed-forward output replaced by its transcoder's.

A transcoder reads `decoder.blocks.{l}.ln2.hook_normalized` and writes `decoder.blocks.{l}.hook_ffn_out`, two
hook points of one block: `transcoder_hooks` keeps the input the first one saw and replaces the value at the
second. The hooks are `fwd_hooks` for `generate`, `run_with_hooks`, `model.hooks(...)`: run hooks, gone when
the run ends. As `features.sae.sae_hooks`, they may be limited to chosen denoising steps, expose the feature
activations (`on_feature_acts`) and edit them (`feature_edit`, to ablate or steer a feature at a step).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from diffusionlens.graphs.transcoders import TranscoderSet, transcoder_input_hook, transcoder_output_hook

if TYPE_CHECKING:
    from diffusionlens.model import HookedDiffusionGemma

FeatureEdit = Callable[[torch.Tensor, Any], torch.Tensor]


def transcoder_hooks(
    transcoders: TranscoderSet,
    layers: Iterable[int] | None = None,
    steps: Iterable[int] | None = None,
    use_error_term: bool = False,
    *,
    feature_edit: FeatureEdit | None = None,
    on_feature_acts: Callable[[torch.Tensor, Any], None] | None = None,
    model: HookedDiffusionGemma | None = None,
) -> list[tuple[str, Callable]]:
    """`fwd_hooks` splicing `transcoders` into `layers` (None: every layer) at denoising `steps` (None: all).

    Without the error term a layer's `hook_ffn_out` becomes the transcoder's output `decode(encode(x))` of the
    block's normalised input `x`. With it the value is `ffn_out + decode(edited) - decode(acts)`: the model's own
    output plus the edit's effect, so without a `feature_edit` the run is unchanged bit for bit and the hooks
    only expose the feature activations. `on_feature_acts(acts, hook)` sees each layer's activations
    (`[batch, pos, d_transcoder]`; `hook.name` is the layer's `hook_ffn_out`, `hook.ctx.step` the step);
    `feature_edit(acts, hook)` returns the activations to decode in their place.

    Transcoders compute in their own dtype and device; the result is cast back to the model's. Pass `model` to
    have the set checked against it (layers, width, config, weights fingerprint) before anything runs.
    """
    if model is not None:
        transcoders.check(model)
    n_layers = len(transcoders)
    chosen = list(range(n_layers)) if layers is None else [int(layer) for layer in layers]
    outside = [layer for layer in chosen if not 0 <= layer < n_layers]
    if outside:
        raise IndexError(f"layers {outside} are out of range: the set has transcoders for layers 0..{n_layers - 1}")
    wanted = None if steps is None else {int(step) for step in steps}
    hooks: list[tuple[str, Callable]] = []
    for layer in sorted(set(chosen)):
        hooks += _layer_hooks(transcoders, layer, wanted, use_error_term, feature_edit, on_feature_acts)
    return hooks


def _layer_hooks(
    transcoders: TranscoderSet,
    layer: int,
    wanted: set[int] | None,
    use_error_term: bool,
    feature_edit: FeatureEdit | None,
    on_feature_acts: Callable[[torch.Tensor, Any], None] | None,
) -> list[tuple[str, Callable]]:
    transcoder = transcoders[layer]
    read: list[torch.Tensor] = []  # the block's normalised input, held from its hook to the block's output

    def keep_input(x: torch.Tensor, hook: Any) -> torch.Tensor:
        read.clear()
        if wanted is None or hook.ctx.step in wanted:
            read.append(x)
        return x

    def splice(out: torch.Tensor, hook: Any) -> torch.Tensor:
        if wanted is not None and hook.ctx.step not in wanted:
            return out
        if not read:
            raise RuntimeError(
                f"{hook.name} fired without {transcoder_input_hook(layer)} before it in the same pass; "
                "transcoder hooks must be given to the run together (both hooks of each layer)"
            )
        x = read.pop()
        weight = transcoder.W_enc
        acts = transcoder.encode(x.to(device=weight.device, dtype=weight.dtype))
        if on_feature_acts is not None:
            on_feature_acts(acts, hook)
        if use_error_term and feature_edit is None:
            return out
        edited = feature_edit(acts, hook) if feature_edit is not None else acts
        spliced = transcoder.decode(edited)
        if use_error_term:
            return out + (spliced - transcoder.decode(acts)).to(device=out.device, dtype=out.dtype)
        return spliced.to(device=out.device, dtype=out.dtype)

    return [(transcoder_input_hook(layer), keep_input), (transcoder_output_hook(layer), splice)]


@dataclass(frozen=True)
class FeatureIntervention:
    """Set transcoder feature `feature` of `layer` at canvas `position` and denoising `step` to `value`
    (0: ablate it; its recorded activation times a factor: steer it), in every batch row."""

    step: int
    layer: int
    position: int
    feature: int
    value: float = 0.0


def intervention_hooks(
    transcoders: TranscoderSet,
    interventions: Iterable[FeatureIntervention],
    *,
    model: HookedDiffusionGemma | None = None,
) -> list[tuple[str, Callable]]:
    """`fwd_hooks` that apply `interventions` through the transcoders' features with the error term: each
    touched (step, layer) output becomes `ffn_out + decode(edited) - decode(acts)`, so only the edited
    features' decoder directions are added to the model's own computation, and every other layer and step is
    left alone. This is how an attribution graph's prediction is checked on the real model."""
    chosen = list(interventions)
    n_layers, width = len(transcoders), transcoders[0].d_transcoder
    bad = [i for i in chosen if not (0 <= i.layer < n_layers and 0 <= i.feature < transcoders[i.layer].d_transcoder)]
    if bad:
        raise IndexError(
            f"interventions {bad} name a layer or feature outside the set: layers 0..{n_layers - 1}, "
            f"features 0..{width - 1}"
        )
    by_site: dict[tuple[int, str], list[FeatureIntervention]] = {}
    for intervention in chosen:
        by_site.setdefault((intervention.step, transcoder_output_hook(intervention.layer)), []).append(intervention)

    def edit(acts: torch.Tensor, hook: Any) -> torch.Tensor:
        here = by_site.get((hook.ctx.step, hook.name))
        if not here:
            return acts
        edited = acts.clone()
        for intervention in here:
            if not 0 <= intervention.position < acts.shape[-2]:
                raise IndexError(
                    f"position {intervention.position} is outside the canvas: positions 0..{acts.shape[-2] - 1}"
                )
            edited[..., intervention.position, intervention.feature] = intervention.value
        return edited

    layers = sorted({i.layer for i in chosen})
    steps = sorted({i.step for i in chosen})
    return transcoder_hooks(transcoders, layers, steps, use_error_term=True, feature_edit=edit, model=model)
