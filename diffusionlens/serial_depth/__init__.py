"""Opaque serial depth of PyTorch computations (a port of DeepMind's JAX ``serial_depth`` rules to ATen).

Quick use::

    from diffusionlens.serial_depth import serial_depth
    serial_depth(module, example_input).depth
"""

from .boundary import interpretable
from .compose import GenerationDepths, compose_depths
from .depth import OpStats, PathStep, SerialDepthResult, graph_depth, serial_depth
from .report import (
    PAPER_NAIVE_RATIO,
    DepthReport,
    DepthTable,
    DepthTableRow,
    build_depth_table,
    depth_table,
    format_depth_table,
    naive_ratio_at,
    report,
    steps_for_naive_ratio,
    table_step_counts,
    topk_readout,
)
from .rules import REFERENCE_COMPAT_OVERRIDES, RULES, Rule, clog2
from .trace import trace

__all__ = [
    "serial_depth",
    "compose_depths",
    "GenerationDepths",
    "report",
    "DepthReport",
    "topk_readout",
    "depth_table",
    "build_depth_table",
    "format_depth_table",
    "DepthTable",
    "DepthTableRow",
    "PAPER_NAIVE_RATIO",
    "naive_ratio_at",
    "steps_for_naive_ratio",
    "table_step_counts",
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
