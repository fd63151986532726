"""Analyses of denoising trajectories: commit order, self-correction, smearing, intermediate context,
logit lens by step, and variable transparency."""

from diffusionlens.analysis.commit_order import (
    CommitOrder,
    answer_mask,
    commit_order,
    commit_order_summary,
    commit_steps,
    kendall_tau_b,
    out_of_order_share,
)
from diffusionlens.analysis.dla import DLA_COMPONENT_NAMES, DLA_NAMES, DLA_NEURON_NAMES, DLAByStep, dla_by_step
from diffusionlens.analysis.intermediate_context import (
    IntermediateAttention,
    IntermediateToken,
    attention_to_intermediate,
    intermediate_mask,
    intermediate_tokens,
)
from diffusionlens.analysis.logit_lens import (
    LensTokenScores,
    LogitLensByStep,
    logit_lens_by_step,
    logit_lens_logits,
    logit_lens_rows,
    logit_lens_token_scores,
)
from diffusionlens.analysis.seeds import RowReplayNoise, SeededBatch, generate_over_seeds
from diffusionlens.analysis.self_correction import (
    CorrectionEvent,
    CorrectionSearch,
    FoundCorrection,
    correction_counts,
    find_corrections,
    search_corrections,
)
from diffusionlens.analysis.smearing import SequenceSmearing, sequence_smearing, token_smearing, token_smearing_mass
from diffusionlens.analysis.transparency import (
    auroc,
    auroc_ci,
    bootstrap_weights,
    top1_matches_final,
    top_k_mass,
    transparency_summary,
    weighted_auroc,
)

__all__ = [
    "DLA_COMPONENT_NAMES",
    "DLA_NAMES",
    "DLA_NEURON_NAMES",
    "DLAByStep",
    "dla_by_step",
    "CommitOrder",
    "CorrectionEvent",
    "CorrectionSearch",
    "FoundCorrection",
    "IntermediateAttention",
    "IntermediateToken",
    "LensTokenScores",
    "LogitLensByStep",
    "RowReplayNoise",
    "SeededBatch",
    "SequenceSmearing",
    "answer_mask",
    "attention_to_intermediate",
    "auroc",
    "auroc_ci",
    "bootstrap_weights",
    "commit_order",
    "commit_order_summary",
    "commit_steps",
    "correction_counts",
    "find_corrections",
    "generate_over_seeds",
    "intermediate_mask",
    "intermediate_tokens",
    "kendall_tau_b",
    "logit_lens_by_step",
    "logit_lens_logits",
    "logit_lens_rows",
    "logit_lens_token_scores",
    "out_of_order_share",
    "search_corrections",
    "sequence_smearing",
    "token_smearing",
    "token_smearing_mass",
    "top1_matches_final",
    "top_k_mass",
    "transparency_summary",
    "weighted_auroc",
]
