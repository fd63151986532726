"""Direct logit attribution across denoising steps: how much each component of the decoder's residual
writes a target token's logit (or a target-minus-other logit difference) at one canvas position, at
every step of a generation.

The final norm is linear once its scale is fixed, so with `decoder.ln_final.hook_scale` recorded the
pre-soft-cap logit is exactly the sum of each component pushed through (scale × gain) and the tied
unembedding (`ActivationCache.logit_attrs`). The soft-cap (tanh) comes after and is not linear:
attributions explain the logit before it.

Two granularities, both exact:

- `granularity="block"` (default): the embedding path and each block's `hook_attn_out` / `hook_ffn_out`
  (`ActivationCache.decompose_resid`); record `DLA_NAMES`.
- `granularity="component"`: every head, the dense MLP (or each of its neurons with `expand_neurons`)
  and every expert of every block, plus `embed` and `self_cond`
  (`ActivationCache.get_full_resid_decomposition`); record `DLA_COMPONENT_NAMES` (`DLA_NEURON_NAMES`
  with `expand_neurons`) after switching the opt-in hooks on with `model.set_use_attn_result(True)` and
  `model.set_use_expert_outputs(True)`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from jaxtyping import Float

from diffusionlens.cache.activation import ActivationCache
from diffusionlens.cache.decomposition import SWITCHES
from diffusionlens.patching.metrics import PRE_SOFTCAP, reads_record

if TYPE_CHECKING:
    from diffusionlens.cache.denoising import DenoisingCache
    from diffusionlens.model import HookedDiffusionGemma

Granularity = Literal["block", "component"]

#: What `generate_with_cache(..., names_filter=DLA_NAMES)` must record for `dla_by_step` (block granularity).
DLA_NAMES = [
    "decoder.blocks.0.hook_resid_pre",
    "decoder.blocks.*.hook_attn_out",
    "decoder.blocks.*.hook_ffn_out",
    "decoder.ln_final.hook_scale",
    "decoder.ln_final.hook_normalized",
]

#: What `dla_by_step(..., granularity="component")` needs: heads, the dense MLP and experts through their
#: norms' cached scales. `attn.hook_result` and `moe.hook_expert_out` are opt-in hooks: they fire only
#: after `model.set_use_attn_result(True)` and `model.set_use_expert_outputs(True)`.
DLA_COMPONENT_NAMES = [
    "decoder.hook_embed",
    "decoder.self_cond.hook_out",
    "decoder.self_cond.post_norm.hook_scale",
    "decoder.blocks.*.attn.hook_result",
    "decoder.blocks.*.ln1_post.hook_scale",
    "decoder.blocks.*.hook_mlp_out",
    "decoder.blocks.*.moe.hook_expert_out",
    "decoder.blocks.*.moe.hook_expert_indices",
    "decoder.blocks.*.ln2_post_moe.hook_scale",
    "decoder.blocks.*.ln2_post.hook_scale",
    "decoder.ln_final.hook_scale",
    "decoder.ln_final.hook_normalized",
]

#: `DLA_COMPONENT_NAMES` plus what `expand_neurons=True` needs: each dense-MLP neuron's activation and the
#: dense branch's post-norm scale (`d_mlp` values per position and step: far more than the whole MLP).
DLA_NEURON_NAMES = [
    *DLA_COMPONENT_NAMES,
    "decoder.blocks.*.mlp.hook_post",
    "decoder.blocks.*.ln2_post_mlp.hook_scale",
]


@dataclass(frozen=True)
class DLAByStep:
    """attributions `[step, component]`: each component's share of the target logit (difference) before
    the soft-cap, at `position` of canvas `canvas`, row `row`; labels name the components. At
    `granularity="block"`: `embed` (the self-conditioned input), then `{layer}_attn_out`, `{layer}_ffn_out`;
    at `"component"`: `embed`, `self_cond`, then per layer its heads `L{l}H{h}` (and `L{l}_attn_bias`
    with attention biases), `L{l}_mlp` (or neurons `L{l}N{n}`) and experts `L{l}E{e}`.
    logit `[step]` is the logit (difference) read off the final norm's output, which the attributions
    sum to: before the soft-cap (`logits_read`). `logit_softcapped` `[step]` is the same target (minus
    other) on the soft-capped logits the model returns (`decoder.hook_logits`), which the patching
    metrics read: `LogitDiff(position, target, other, step=s, canvas=canvas)` on the same run gives
    `logit_softcapped` at step s."""

    attributions: Float[torch.Tensor, "step component"]
    labels: list[str]
    steps: list[int]
    logit: Float[torch.Tensor, " step"]
    position: int
    target: int
    other: int | None
    canvas: int = 0
    row: int = 0
    granularity: Granularity = "block"
    logit_softcapped: Float[torch.Tensor, " step"] | None = None
    logits_read: ClassVar[str] = PRE_SOFTCAP

    def reads(self) -> dict[str, Any]:
        """What the table reads, in the same terms as a patching metric's `reads()`."""
        return reads_record("dla_by_step", "recorded", self.canvas, list(self.steps), self.logits_read, row=self.row)

    def top(self, step: int, k: int = 5) -> list[tuple[str, float]]:
        """The `k` components with the largest attribution (by absolute value) at `step`."""
        values = self.attributions[self.steps.index(step)]
        order = values.abs().argsort(descending=True)[:k]
        return [(self.labels[i], float(values[i])) for i in order]

    @property
    def layers(self) -> list[int | None]:
        """The block each component belongs to (`3_attn_out`, `L3H1`, `L3E0` → 3); None for `embed`,
        `self_cond` and `rest`."""
        found = [re.match(r"L(\d+)|(\d+)_", label) for label in self.labels]
        return [None if m is None else int(m.group(1) or m.group(2)) for m in found]

    def keep_top(self, k: int) -> DLAByStep:
        """The `k` components with the largest attribution at any step (by absolute value), in their
        original order, plus a `rest` column holding the sum of all the others, so every row still sums
        to its logit. A table of at most `k` components comes back unchanged."""
        if k < 1:
            raise ValueError(f"k must be at least 1, not {k}")
        if len(self.labels) <= k:
            return self
        peak = self.attributions.abs().amax(0)
        kept = peak.topk(k).indices.sort().values
        dropped = torch.ones(len(self.labels), dtype=torch.bool)
        dropped[kept] = False
        rest = self.attributions[:, dropped].sum(-1, keepdim=True)
        return replace(
            self,
            attributions=torch.cat((self.attributions[:, kept], rest), dim=-1),
            labels=[*(self.labels[i] for i in kept.tolist()), "rest"],
        )


def _token_id(model: HookedDiffusionGemma, token: int | str) -> int:
    return model.to_single_token(token) if isinstance(token, str) else int(token)


def dla_by_step(
    cache: DenoisingCache,
    target: int | str,
    *,
    position: int,
    other: int | str | None = None,
    steps: Sequence[int] | None = None,
    canvas: int = 0,
    row: int = 0,
    granularity: str = "block",
    expand_neurons: bool = False,
) -> DLAByStep:
    """Direct logit attribution of `target` (minus `other`, when given) at canvas `position`, at every
    recorded step (or `steps`), before the soft-cap.

    granularity="block" (default): the embedding path and each block's attention and FFN outputs,
    rescaled by the later blocks' `layer_scalar`s (`step_cache.decompose_resid()`). The cache must hold
    `DLA_NAMES` at each step: generate with `names_filter=DLA_NAMES` (plus whatever else you record).

    granularity="component": `embed`, `self_cond`, every head, the dense MLP (each neuron with
    `expand_neurons`) and every expert of every block
    (`step_cache.get_full_resid_decomposition()`); the heads of a block sum to its `attn_out`, its MLP
    and experts to its `ffn_out`. The cache must hold `DLA_COMPONENT_NAMES` (`DLA_NEURON_NAMES` with
    `expand_neurons`), two of which are opt-in hooks: switch them on before generating::

        model.set_use_attn_result(True)      # fires decoder.blocks.*.attn.hook_result
        model.set_use_expert_outputs(True)   # fires decoder.blocks.*.moe.hook_expert_out
        result, cache = model.generate_with_cache(ids, names_filter=DLA_COMPONENT_NAMES)

    Either way each step's attributions sum to that step's pre-soft-cap logit (difference) read off
    the final norm (`DLAByStep.logit`); `DLAByStep.logit_softcapped` is the same after the soft-cap, as
    `LogitDiff` reads it. Steps or hooks that were not recorded are refused, naming what
    is missing and how to record it.
    """
    # `granularity` is annotated str, not Granularity, so that a runtime type checker lets this message through
    if granularity not in ("block", "component"):
        raise ValueError(f"granularity must be 'block' or 'component', not {granularity!r}")
    if granularity == "block" and expand_neurons:
        raise ValueError("expand_neurons applies to granularity='component' only")
    model = cache.model
    if model is None:
        raise ValueError("this cache holds no model; build it with model.generate_with_cache")
    recorded = cache.steps(canvas)
    steps = list(recorded) if steps is None else [int(s) for s in steps]
    if not steps:
        raise ValueError(f"no steps recorded for canvas {canvas}")
    unrecorded = [s for s in steps if s not in recorded]
    if unrecorded:
        raise ValueError(f"steps {unrecorded} of canvas {canvas} were not recorded (recorded: {recorded})")
    target_id = _token_id(model, target)
    other_id = None if other is None else _token_id(model, other)
    needed = _needed(model, granularity, expand_neurons)
    token_ids = [target_id] if other_id is None else [target_id, other_id]
    directions = torch.stack([model.tokens_to_residual_directions(t).detach().float() for t in token_ids], -1)
    direction = directions[:, 0] - (directions[:, 1] if other_id is not None else 0.0)
    softcap = model.cfg.final_logit_softcapping
    per_step, logits, capped, labels = [], [], [], None
    for step in steps:
        step_cache = cache.step_cache(step, canvas)
        _check_recorded(step_cache, needed, step, canvas, granularity, expand_neurons)
        one = _one_position(step_cache, needed, row, position)
        if granularity == "block":
            parts, labels = one.decompose_resid(stack="decoder", return_labels=True)
        else:
            parts, labels = one.get_full_resid_decomposition(expand_neurons=expand_neurons, return_labels=True)
        attrs = one.logit_attrs(parts.float(), target_id, incorrect_tokens=other_id)  # [component, 1, 1]
        per_step.append(attrs[:, 0, 0])
        normed = one["decoder.ln_final.hook_normalized"][0, 0].float()
        logits.append(normed @ direction.to(normed.device))
        per_token = normed @ directions.to(normed.device)  # [target(, other)] before the cap
        if softcap is not None:
            per_token = torch.tanh(per_token / softcap) * softcap
        capped.append(per_token[0] - (per_token[1] if other_id is not None else 0.0))
    return DLAByStep(
        attributions=torch.stack(per_step).float().cpu(),
        labels=list(labels),
        steps=steps,
        logit=torch.stack(logits).cpu(),
        position=position,
        target=target_id,
        other=other_id,
        canvas=canvas,
        row=row,
        granularity=granularity,
        logit_softcapped=torch.stack(capped).cpu(),
    )


def _one_position(step_cache: ActivationCache, needed: list[str], row: int, position: int) -> ActivationCache:
    """A cache of the needed hooks at one row and canvas position (`[1, 1, …]`): the decompositions then
    build `[component, 1, 1, d_model]`, not a tensor over every position (on the real model that is
    gigabytes per step at component granularity)."""
    first = step_cache[needed[0]]
    batch, length = first.shape[:2]
    if not 0 <= row < batch:
        raise IndexError(f"row {row} out of range for a batch of {batch}")
    if not 0 <= position < length:
        raise IndexError(f"position {position} out of range for {length} recorded positions")
    return ActivationCache({n: step_cache[n][row : row + 1, position : position + 1] for n in needed}, step_cache.model)


def _check_recorded(
    step_cache: ActivationCache, needed: list[str], step: int, canvas: int, granularity: str, expand_neurons: bool
) -> None:
    missing = [n for n in needed if n not in step_cache]
    if not missing:
        return
    # one entry per hook kind: decoder.blocks.*.attn.hook_result, not one per block
    kinds = list(dict.fromkeys(re.sub(r"blocks\.\d+\.", "blocks.*.", n) for n in missing))
    constant = {"block": "DLA_NAMES", "component": "DLA_COMPONENT_NAMES"}[granularity]
    constant = "DLA_NEURON_NAMES" if expand_neurons else constant
    switches = sorted({s for n in kinds for suffix, s in SWITCHES.items() if n.endswith(suffix)})
    how = f"{' and '.join(switches)} before generating, then " if switches else ""
    raise KeyError(
        f"step {step} of canvas {canvas} lacks {', '.join(kinds)} for granularity={granularity!r}: {how}"
        f"generate_with_cache(..., names_filter=diffusionlens.analysis.{constant}) records what DLA needs"
    )


def _needed(model: HookedDiffusionGemma, granularity: str, expand_neurons: bool) -> list[str]:
    """The hooks one step must hold, by exact name, in the order the error lists them."""
    layers = range(model.cfg.num_hidden_layers)
    final = ["decoder.ln_final.hook_scale", "decoder.ln_final.hook_normalized"]
    if granularity == "block":
        return [
            "decoder.blocks.0.hook_resid_pre",
            *(f"decoder.blocks.{i}.hook_attn_out" for i in layers),
            *(f"decoder.blocks.{i}.hook_ffn_out" for i in layers),
            *final,
        ]
    per_block = ["attn.hook_result", "ln1_post.hook_scale", "ln2_post.hook_scale"]
    per_block += ["mlp.hook_post", "ln2_post_mlp.hook_scale"] if expand_neurons else ["hook_mlp_out"]
    per_block += ["moe.hook_expert_out", "moe.hook_expert_indices", "ln2_post_moe.hook_scale"]
    return [
        "decoder.hook_embed",
        "decoder.self_cond.hook_out",
        "decoder.self_cond.post_norm.hook_scale",
        *(f"decoder.blocks.{i}.{name}" for name in per_block for i in layers),
        *final,
    ]
