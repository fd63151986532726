"""Opaque serial depth of PyTorch computations (a port of DeepMind's JAX ``serial_depth`` rules to ATen).

Quick use::

    from diffusionlens.serial_depth import serial_depth
    serial_depth(module, example_input).depth
"""

from .boundary import interpretable
from .compose import GenerationDepths, compose_depths
from .depth import OpStats, PathStep, SerialDepthResult, graph_depth, serial_depth
from .report import DepthReport, report, topk_readout
from .rules import REFERENCE_COMPAT_OVERRIDES, RULES, Rule, clog2
from .trace import trace

__all__ = [
    "serial_depth",
    "compose_depths",
    "GenerationDepths",
    "report",
    "DepthReport",
    "topk_readout",
    "graph_depth",
    "trace",
    "interpretable",
    "SerialDepthResult",
    "PathStep",
    "OpStats",
    "Rule",
    "RULES",
    "REFERENCE_COMPAT_OVERRIDES",
    "clog2",
]
