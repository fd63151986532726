"""Attribution graphs across denoising steps: transcoders, the replacement model of one trajectory, graphs.

`diffusionlens.graphs.attribute` is `diffusionlens.graphs.attribution.attribute` and `load_transcoders` is
`diffusionlens.graphs.transcoders.load_transcoders`, each loaded on first use (this package imports nothing heavy
at import time).
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "attribute": "diffusionlens.graphs.attribution",
    "attribute_trajectory": "diffusionlens.graphs.attribution",
    "Graph": "diffusionlens.graphs.graph",
    "record_trajectory": "diffusionlens.graphs.trajectory",
    "ReplacementModel": "diffusionlens.graphs.replacement",
    "Transcoder": "diffusionlens.graphs.transcoders",
    "TranscoderSet": "diffusionlens.graphs.transcoders",
    "load_transcoders": "diffusionlens.graphs.transcoders",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'diffusionlens.graphs' has no attribute {name!r}")
