"""Activation patching across denoising steps, positions, layers, heads and channels."""

from diffusionlens.patching.attribution import attribution_patch
from diffusionlens.patching.channels import CHANNELS, channel_patches
from diffusionlens.patching.metrics import ExactMatch, KLToClean, LogitDiff, Normalized, TargetProb
from diffusionlens.patching.runs import PatchedRun, record_run, run_patched
from diffusionlens.patching.spec import CrossStep, Patch, patch_hooks
from diffusionlens.patching.sweep import SweepResult, patch_sweep

__all__ = [
    "attribution_patch",
    "CHANNELS",
    "CrossStep",
    "ExactMatch",
    "KLToClean",
    "LogitDiff",
    "Normalized",
    "Patch",
    "PatchedRun",
    "SweepResult",
    "TargetProb",
    "channel_patches",
    "patch_hooks",
    "patch_sweep",
    "record_run",
    "run_patched",
]
