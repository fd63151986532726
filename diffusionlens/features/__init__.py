"""Features and directions across denoising steps: activation stores, SAEs, probes and steering.

SAELens is an optional extra (`pip install diffusionlens[sae]`), imported only when an SAE helper runs.
"""

from diffusionlens.features.causal_rows import CAUSAL_LABEL_FIELDS, CausalRows
from diffusionlens.features.probes import ProbeResult, split_prompts, train_probe
from diffusionlens.features.sae import (
    ARCHITECTURES,
    FeatureExamples,
    check_sae,
    generate_with_sae,
    sae_hooks,
    sae_metrics,
    sae_width,
    top_activations,
    train_sae,
)
from diffusionlens.features.steering import (
    mean_activation,
    mean_difference,
    schedule_scale,
    steering_hooks,
    steering_sweep,
)
from diffusionlens.features.store import LABEL_FIELDS, ActivationStore, StoreMismatchError, config_hash

__all__ = [
    "CAUSAL_LABEL_FIELDS",
    "LABEL_FIELDS",
    "ActivationStore",
    "CausalRows",
    "FeatureExamples",
    "ProbeResult",
    "StoreMismatchError",
    "ARCHITECTURES",
    "check_sae",
    "config_hash",
    "generate_with_sae",
    "mean_activation",
    "mean_difference",
    "sae_hooks",
    "sae_metrics",
    "sae_width",
    "schedule_scale",
    "split_prompts",
    "steering_hooks",
    "steering_sweep",
    "top_activations",
    "train_probe",
    "train_sae",
]
