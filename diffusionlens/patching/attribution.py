"""Attribution patching: a first-order estimate of every (layer, step, position) patch at once.

For each step of the corrupted run's frozen trajectory, one forward and one backward pass give the
gradient of the metric with respect to the hook's value at every layer and position; the estimated
effect of patching the clean value in is (clean - corrupted) · gradient, summed over the feature
axis. The number of passes is twice the number of steps, whatever the layers and positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from diffusionlens.cache.selectors import resolve_layers
from diffusionlens.patching.metrics import metric_reads, with_token_ids
from diffusionlens.patching.runs import SELF_COND, PatchedRun, encode_through
from diffusionlens.patching.sweep import SweepResult
from diffusionlens.sampling.recorded import rerun_recorded_pass

if TYPE_CHECKING:
    from diffusionlens.model import HookedDiffusionGemma


def attribution_patch(
    model: HookedDiffusionGemma,
    clean: PatchedRun,
    corrupted: PatchedRun,
    hook: str,
    metric,
    *,
    steps: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    canvas: int = 0,
) -> SweepResult:
    """Estimated metric change for patching `hook` (with `{layer}`) from clean into corrupted, per
    (layer, step, position): `values[layer, step, position]`.

    `metric.on_logits(logits)` must be differentiable (LogitDiff and TargetProb are); at each step it
    is applied to that step's logits, as a frozen-trajectory patch at that step would be scored (the
    metric's own `step` and `canvas` are not used: the step axis and `canvas` are;
    `metadata["metric_reads"]` says so).
    """
    if not hasattr(metric, "on_logits"):
        raise TypeError("attribution needs a metric with a differentiable on_logits(logits) (LogitDiff, TargetProb)")
    metric = with_token_ids(metric, model)
    layers = resolve_layers(layers, model.cfg.num_hidden_layers)
    steps = list(steps if steps is not None else range(min(corrupted.trace.steps(canvas), clean.trace.steps(canvas))))
    names = [hook.format(layer=layer) for layer in layers]
    missing = [n for n in names if n not in clean.cache]
    if missing:
        raise ValueError(f"the clean run did not record {missing[:3]}; pass them in record_run(names_filter=...)")
    out = torch.zeros(len(layers), len(steps), model.cfg.canvas_length)
    ctx = model.hook_ctx
    with torch.no_grad():
        state = encode_through(model, corrupted, canvas)
    leaves: dict[str, torch.Tensor] = {}
    root = "decoder.hook_embed"

    def start_graph(value: torch.Tensor, point) -> torch.Tensor:
        # Weights need no gradient: an equal leaf at the embedding makes every later value part of
        # the graph, so the gradient reaches each hooked value (keeping them, not replacing them).
        leaf = value.detach().requires_grad_(True)
        if point.name in names:
            leaves[point.name] = leaf
        return leaf

    def keep(value: torch.Tensor, point) -> None:
        leaves[point.name] = value

    try:
        for j, step in enumerate(steps):
            leaves.clear()
            self_cond = corrupted.cache.get(SELF_COND, canvas=canvas, step=step) if step > 0 else None
            with (
                torch.enable_grad(),
                model.hooks_for_run(fwd_hooks=[(root, start_graph), *((n, keep) for n in names if n != root)]),
            ):
                logits = rerun_recorded_pass(model, corrupted.trace, state, self_cond, canvas=canvas, step=step)
                grads = torch.autograd.grad(metric.on_logits(logits), [leaves[n] for n in names], allow_unused=True)
            for i, (name, grad) in enumerate(zip(names, grads, strict=True)):
                if grad is None:
                    continue
                delta = clean.cache.get(name, canvas=canvas, step=step).to(grad.dtype) - leaves[name].detach()
                # The metric averages over the batch, so its gradient already carries the 1/batch factor.
                out[i, j] = (delta * grad).flatten(2).sum(-1).sum(0).float().cpu()
    finally:
        ctx.reset()
    labels = {"layer": layers, "step": steps, "position": list(range(model.cfg.canvas_length))}
    reads = {
        **metric_reads(metric),
        "run": "corrupted, re-run with gradients",
        "canvas": canvas,
        "step": "each step of the step axis",
    }
    return SweepResult(
        out, ("layer", "step", "position"), labels, {"hook": hook, "mode": "attribution", "metric_reads": reads}
    )
