"""Tolerances for tests that compare two computations of one value along different paths.

Only paths equal by construction (the same kernels on the same shapes in the same order) are compared bit for
bit. Two paths whose matmul shapes differ (cells batched against one cell, a sweep against a single re-run, a
fused attention against an explicit one) sum in another order, and CPUs round those orders differently: Intel
Xeon and AMD EPYC disagree in the last bits (issue #37). Each sequential reduction can move a value by a few
units in the last place of its magnitude, and a network of `depth` such reductions adds them up, so the bound
below grows with the dtype's epsilon, the magnitude of what is compared and the depth of the path. It is loose
(tens of times what any CPU shows) and still far below any effect a patch or a bug has on these models.
"""

from __future__ import annotations

import torch

# Units in the last place one reordered reduction may contribute, generously.
ULPS_PER_REDUCTION = 4


def reordering_atol(dtype: torch.dtype, *, magnitude: float, depth: int) -> float:
    """Absolute tolerance for a value of size up to `magnitude` computed through `depth` sequential reductions
    (matmuls, attention, norms) whose order differs between the two paths."""
    return ULPS_PER_REDUCTION * depth * torch.finfo(dtype).eps * float(magnitude)


def model_depth(model) -> int:
    """Sequential reductions from the prompt to the logits: attention and feed-forward per layer, each with its
    norms, in the encoder (whose keys and values the decoder reads) and the decoder, then the final norm and the
    unembedding."""
    return 2 * 4 * model.cfg.num_hidden_layers + 2


def logit_metric_atol(model, logits: torch.Tensor | None = None, *, terms: int = 2) -> float:
    """Tolerance for a metric summing `terms` logits (a logit difference has two) of a decoder pass whose logits
    are of the size of `logits` (default: the soft-cap, which bounds every logit), when the two runs reach them
    by different matmul shapes."""
    if logits is None:
        magnitude, dtype = model.cfg.final_logit_softcapping, model.dtype
    else:
        magnitude, dtype = float(logits.abs().max()), logits.dtype
    return terms * reordering_atol(dtype, magnitude=magnitude, depth=model_depth(model))


def summed_parts_atol(parts: torch.Tensor) -> float:
    """Tolerance for `parts.sum(0)` against the value the model accumulated from the same parts in another
    order (a residual decomposition against the residual stream): each of the additions rounds by at most
    one unit in the last place of the running sum, which is bounded by the sum of the parts' magnitudes."""
    magnitude = float(parts.abs().sum(0).max())
    return reordering_atol(parts.dtype, magnitude=magnitude, depth=parts.shape[0])


def readout_atol(model, logits: torch.Tensor) -> float:
    """Tolerance for logits recomputed from a cached final residual (the logit lens's last layer) against the
    model's own: the final norm and the unembedding, run on other shapes."""
    return reordering_atol(logits.dtype, magnitude=float(logits.abs().max()), depth=2)


def trajectory_atol(model, steps: int, *, terms: int = 1) -> float:
    """Tolerance for a value read after `steps` denoising steps of two runs that reach each step by different
    matmul shapes (batched cells against single runs): each step's pass reads the previous step's logits
    (self-conditioning), so the reorderings of every pass so far add up."""
    return steps * logit_metric_atol(model, terms=terms)
