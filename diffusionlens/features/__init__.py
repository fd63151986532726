"""Features and directions across denoising steps: activation stores, SAEs, probes and steering.

SAELens is an optional extra (`pip install diffusionlens[sae]`), imported only by the SAE helpers.
"""

from diffusionlens.features.store import LABEL_FIELDS, ActivationStore, StoreMismatchError, config_hash

__all__ = ["LABEL_FIELDS", "ActivationStore", "StoreMismatchError", "config_hash"]
