"""Composing per-pass depths into the opaque depth of a whole generation.

Serial depth is a longest path, so it composes in the (max, +) algebra: if a pass maps an input at depth ``a``
to an output at depth ``max(a + D_in, D_other)``, chaining passes adds the ``D_in`` terms along the chain and
takes maxima where chains meet. Interpretable states (token ids, a top-k token distribution) reset the chain.

DiffusionGemma, one canvas of ``S`` denoising steps:

* Naive self-conditioning: step ``t`` feeds its (temperature-processed) logits to step ``t+1`` through
  ``softmax(logits) @ E``, a continuous state. The chain never resets inside a canvas, so
  ``depth(logits_t) = max(depth(logits_{t-1}) + link + D_sc, D_step)`` and the canvas' opaque depth is
  ``D_step + (S - 1) * (link + D_sc) + readout``, where ``D_step`` is the first step's depth from tokens
  (encoder over the prompt, then decoder) and ``D_sc`` the decoder's depth from its self-conditioning input.
* Token bottleneck: each step's self-conditioning input is an interpretable top-k token distribution, so every
  step starts from interpretable states and the opaque depth is one step: ``D_step + readout``.
* Across canvases: the committed canvas tokens are interpretable, and the encoder's KV cache is a function of
  tokens only (the KV of position i depends on tokens <= i, like an AR cache), so nothing carries over and the
  generation's depth is the max over canvases, i.e. one canvas' depth. (``carry_sc_across_canvases`` models a
  hypothetical sampler that kept self-conditioning logits across canvases.)

Autoregressive Gemma 4 baseline: every token's forward pass reads tokens and a KV cache computed from tokens,
so the longest opaque chain is one forward pass plus the readout: ``D_ar + readout``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GenerationDepths", "compose_depths"]


@dataclass(frozen=True)
class GenerationDepths:
    """Opaque depths of a whole generation.

    Attributes:
        naive: DiffusionGemma with naive (logit) self-conditioning.
        bottleneck: DiffusionGemma with the self-conditioning logits replaced by a token distribution.
        ar: autoregressive Gemma 4 baseline.
        naive_ratio: ``naive / ar``.
        bottleneck_ratio: ``bottleneck / ar``.
        per_canvas_naive: naive depth of a single canvas.
    """

    naive: int
    bottleneck: int
    ar: int
    naive_ratio: float
    bottleneck_ratio: float
    per_canvas_naive: int


def compose_depths(
    step_depth: int,
    sc_depth: int,
    ar_depth: int,
    steps: int,
    canvases: int = 1,
    readout_depth: int = 0,
    link_depth: int = 1,
    carry_sc_across_canvases: bool = False,
) -> GenerationDepths:
    """Opaque depth of a generation from per-pass depths.

    Args:
        step_depth: one denoising step from interpretable inputs (prompt tokens through the encoder's KV
            cache, canvas tokens, an interpretable self-conditioning input) to the output logits.
        sc_depth: longest path inside one decoder pass from the self-conditioning logits to the output logits.
        ar_depth: one autoregressive forward pass from tokens (and a token-computed KV cache) to logits.
        steps: denoising steps per canvas.
        canvases: number of canvases generated.
        readout_depth: logits -> interpretable output (sampling, or the top-k distribution of the bottleneck);
            charged once at the end of every opaque chain, for all three models alike.
        link_depth: logits -> next step's self-conditioning logits (the logits processor: temperature).
        carry_sc_across_canvases: if True, self-conditioning logits also flow into the next canvas' first step.

    Returns:
        The composed :class:`GenerationDepths`.
    """
    if steps < 1 or canvases < 1:
        raise ValueError(f"steps and canvases must be >= 1, got {steps} and {canvases}")
    per_step = link_depth + sc_depth
    per_canvas = max(step_depth, step_depth + (steps - 1) * per_step) + readout_depth
    if carry_sc_across_canvases:
        naive = max(step_depth, step_depth + (steps * canvases - 1) * per_step) + readout_depth
    else:
        naive = per_canvas
    bottleneck = step_depth + readout_depth
    ar = ar_depth + readout_depth
    return GenerationDepths(
        naive=naive,
        bottleneck=bottleneck,
        ar=ar,
        naive_ratio=naive / ar,
        bottleneck_ratio=bottleneck / ar,
        per_canvas_naive=per_canvas,
    )
