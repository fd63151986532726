"""The DiffusionGemma vs autoregressive Gemma 4 opaque-depth report."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from diffusionlens.config import DiffusionGemmaConfig

from .boundary import interpretable
from .compose import GenerationDepths, compose_depths
from .depth import SerialDepthResult, graph_depth, serial_depth
from .passes import CausalLMPass, DiffusionStepPass, EncoderPass, build_depth_model, load_config
from .trace import trace

__all__ = [
    "DepthReport",
    "DepthTable",
    "DepthTableRow",
    "PAPER_NAIVE_RATIO",
    "build_depth_table",
    "depth_table",
    "format_depth_table",
    "naive_ratio_at",
    "report",
    "steps_for_naive_ratio",
    "table_step_counts",
    "topk_readout",
]

#: Naive self-conditioning / AR opaque-depth ratio reported by "How Transparent is DiffusionGemma?".
PAPER_NAIVE_RATIO = 28.6


def topk_readout(logits: Float[Tensor, "... v"], k: int = 64, temperature: float = 1.0) -> Tensor:
    """Logits -> an interpretable top-k token distribution (the bottleneck / a top-k sampler's view)."""
    values, idx = torch.topk(logits / temperature, k=k, dim=-1)
    return interpretable(torch.softmax(values, dim=-1)), interpretable(idx)


@dataclass
class DepthReport:
    """Per-pass depths, the composed generation depths and the settings they were measured with."""

    encoder: int
    decoder: int
    decoder_from_sc: int
    step: int
    ar: int
    readout: int
    generation: GenerationDepths
    settings: dict[str, Any] = field(default_factory=dict)
    results: dict[str, SerialDepthResult] = field(default_factory=dict, repr=False)

    def __str__(self) -> str:
        g, s = self.generation, self.settings
        rows = [
            f"config: {s.get('config')}  prompt_len={s.get('prompt_len')} canvas={s.get('canvas_length')} "
            f"steps={s.get('steps')} canvases={s.get('canvases')} readout_k={s.get('readout_k')}",
            f"encoder pass (prompt tokens -> KV cache)        {self.encoder}",
            f"decoder pass (canvas tokens + sc input -> logits) {self.decoder}",
            f"decoder pass from self-conditioning logits      {self.decoder_from_sc}",
            f"diffusion step (encoder + decoder, from tokens) {self.step}",
            f"AR Gemma 4 pass (prompt+canvas tokens -> logits) {self.ar}",
            f"readout (logits -> top-k distribution)          {self.readout}",
            f"opaque depth, naive self-conditioning           {g.naive}  ({g.naive_ratio:.2f}x AR)",
            f"opaque depth, token bottleneck                  {g.bottleneck}  ({g.bottleneck_ratio:.2f}x AR)",
            f"opaque depth, AR baseline                       {g.ar}",
            f"trace time {s.get('seconds', 0):.1f}s",
        ]
        return "\n".join(rows)


def report(
    config: str | Path | dict[str, Any] | DiffusionGemmaConfig | None = None,
    prompt_len: int = 1024,
    steps: int = 48,
    canvases: int = 1,
    readout_k: int = 64,
    link_depth: int = 1,
    dtype: torch.dtype = torch.float32,
) -> DepthReport:
    """Measures DiffusionGemma's and AR Gemma 4's opaque serial depth from a config.

    Args:
        config: a DiffusionGemma ``config.json`` path or dict (``text_config`` + ``canvas_length``), a bare
            text config, or a :class:`DiffusionGemmaConfig`; defaults to the shipped 26B-A4B config. The real
            :class:`HookedDiffusionGemma` is built from it on the meta device and traced (see :mod:`.passes`).
        prompt_len: prompt tokens in the encoder's KV cache. The AR baseline is traced over
            ``prompt_len + canvas_length`` tokens, the same context the canvas attends to.
        steps: denoising steps per canvas.
        canvases: canvases generated (they do not compound; see :mod:`.compose`).
        readout_k: k of the top-k readout charged at the end of every opaque chain.
        link_depth: depth of the logits processor between steps (temperature division: 1).
        dtype: dtype of the meta trace (only matters with reference-compatible cast rules).
    """
    t0 = time.perf_counter()
    cfg = load_config(config)
    model = build_depth_model(cfg, dtype)
    canvas = cfg.canvas_length
    meta = torch.device("meta")
    prompt = torch.empty(1, prompt_len, dtype=torch.long, device=meta)
    canvas_ids = torch.empty(1, canvas, dtype=torch.long, device=meta)
    sc_logits = torch.empty(1, canvas, cfg.vocab_size, dtype=dtype, device=meta)

    # One trace of encoder + decoder serves every diffusion number: sources pick which inputs chains start
    # from (all: the step; sc logits only: D_sc; canvas + sc: the decoder without the encoder's chain).
    step_graph = trace(DiffusionStepPass(model), prompt, canvas_ids, sc_logits)
    step = graph_depth(step_graph)
    from_sc = graph_depth(step_graph, sources=[2])
    decoder = graph_depth(step_graph, sources=[1, 2])
    encoder = _encoder_depth(model, prompt)
    ar = serial_depth(CausalLMPass(model), torch.empty(1, prompt_len + canvas, dtype=torch.long, device=meta))
    readout = serial_depth(topk_readout, torch.empty(1, canvas, cfg.vocab_size, device=meta), k=readout_k)

    gen = compose_depths(
        step_depth=step.depth,
        sc_depth=from_sc.depth,
        ar_depth=ar.depth,
        steps=steps,
        canvases=canvases,
        readout_depth=readout.depth,
        link_depth=link_depth,
    )
    settings = {
        "config": _config_label(config),
        "prompt_len": prompt_len,
        "canvas_length": canvas,
        "steps": steps,
        "canvases": canvases,
        "readout_k": readout_k,
        "seconds": time.perf_counter() - t0,
    }
    results = {"step": step, "decoder_from_sc": from_sc, "decoder": decoder, "ar": ar, "readout": readout}
    depths = {name: result.depth for name, result in results.items()}  # a field of the report each
    return DepthReport(encoder=encoder, generation=gen, settings=settings, results=results, **depths)


def _config_label(config: str | Path | dict[str, Any] | DiffusionGemmaConfig | None) -> str:
    if config is None:
        return "shipped 26B-A4B"
    if isinstance(config, (dict, DiffusionGemmaConfig)):
        return type(config).__name__
    return str(config)


def _encoder_depth(model: torch.nn.Module, prompt: Tensor) -> int:
    """Depth of the encoder's KV outputs (the deepest cache entry, from prompt tokens)."""
    res = serial_depth(EncoderPass(model), prompt)
    return max(d for d in res.output_depths if d is not None)


# ------------------------------------------------------------------------------------------- the CLI table


@dataclass(frozen=True)
class DepthTableRow:
    """One row of the depth table: an opaque chain ending in the top-k readout, and its ratio to AR.

    ``steps`` is the number of denoising steps for naive self-conditioning rows, None where it does not apply.
    """

    label: str
    steps: int | None
    depth: int
    ratio: float


@dataclass
class DepthTable:
    """What ``diffusionlens depth`` prints: per-pass depths, composed rows and the steps-to-paper-ratio solve.

    Attributes:
        report: the :class:`DepthReport` the rows are composed from.
        rows: AR token, one decoder pass, naive self-conditioning at several step counts, token bottleneck.
        paper_ratio: the naive ratio to solve for (the paper's 28.6x).
        steps_to_paper: real-valued S at which the naive ratio equals ``paper_ratio`` (from the composition
            formula; ``math.inf`` if the naive chain does not grow with S).
        whole_steps_to_paper: smallest whole number of steps whose naive ratio is >= ``paper_ratio``.
        toy_mean_steps: mean denoising steps measured on the toy model, if given.
        toy_ratio: naive ratio at ``toy_mean_steps`` steps under these depths, if given.
    """

    report: DepthReport
    rows: list[DepthTableRow]
    paper_ratio: float
    steps_to_paper: float
    whole_steps_to_paper: int | float
    toy_mean_steps: float | None = None
    toy_ratio: float | None = None
    link_depth: int = 1


def table_step_counts(steps: int) -> list[int]:
    """Step counts shown for naive self-conditioning: 1, 2, 4, 8, 16, 32, 48 up to ``steps``, and ``steps``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    counts = [s for s in (1, 2, 4, 8, 16, 32, 48) if s <= steps]
    return counts if counts[-1] == steps else [*counts, steps]


def naive_ratio_at(
    steps: float, step_depth: int, sc_depth: int, ar_total: int, readout_depth: int, link_depth: int = 1
) -> float:
    """Naive self-conditioning depth over AR depth at ``steps`` (real-valued) denoising steps.

    ``(D_step + (S - 1)(link + D_sc) + readout) / ar_total``, the :func:`compose_depths` formula, with
    ``ar_total = D_ar + readout``.
    """
    return (step_depth + max(steps - 1, 0) * (link_depth + sc_depth) + readout_depth) / ar_total


def steps_for_naive_ratio(
    ratio: float, step_depth: int, sc_depth: int, ar_total: int, readout_depth: int, link_depth: int = 1
) -> float:
    """Real-valued number of steps S >= 1 at which :func:`naive_ratio_at` equals ``ratio``.

    Solves ``D_step + (S - 1)(link + D_sc) + readout = ratio * ar_total`` for S (exact rational arithmetic,
    ``ratio`` read as its decimal repr). Returns 1.0 if one step already reaches ``ratio``, ``math.inf`` if the
    naive chain does not grow with S and never reaches it. ``math.ceil`` of the result is the smallest whole
    number of steps that reaches ``ratio``.
    """
    target = Fraction(repr(ratio)) * ar_total
    first = step_depth + readout_depth
    if first >= target:
        return 1.0
    per_step = link_depth + sc_depth
    if per_step <= 0:
        return math.inf
    s = 1 + (target - first) / per_step
    return float(s) if s.denominator != 1 else float(s.numerator)


def build_depth_table(
    rep: DepthReport,
    steps: int | None = None,
    toy_mean_steps: float | None = None,
    paper_ratio: float = PAPER_NAIVE_RATIO,
    link_depth: int = 1,
) -> DepthTable:
    """Composes the rows of the depth table from a :class:`DepthReport` (no tracing).

    Args:
        rep: per-pass depths from :func:`report`.
        steps: largest number of denoising steps shown (defaults to the report's ``steps``).
        toy_mean_steps: mean denoising steps measured on the toy model, compared with the solved S.
        paper_ratio: naive ratio to solve the number of steps for.
        link_depth: logits -> next step's self-conditioning input (temperature: 1).
    """
    steps = int(rep.settings.get("steps", 48)) if steps is None else steps
    r = rep.readout
    ar_total = rep.ar + r

    def row(label: str, depth: int, n: int | None = None) -> DepthTableRow:
        return DepthTableRow(label, n, depth, depth / ar_total)

    rows = [
        row("AR Gemma 4, one token (encoder stack, causal)", ar_total),
        row("DiffusionGemma, one decoder pass", rep.decoder + r),
    ]
    for n in table_step_counts(steps):
        g = compose_depths(rep.step, rep.decoder_from_sc, rep.ar, n, readout_depth=r, link_depth=link_depth)
        rows.append(row("DiffusionGemma, naive self-conditioning", g.naive, n))
    rows.append(row("DiffusionGemma, token bottleneck (any steps)", rep.step + r))

    solved = steps_for_naive_ratio(paper_ratio, rep.step, rep.decoder_from_sc, ar_total, r, link_depth)
    toy_ratio = None
    if toy_mean_steps is not None:
        toy_ratio = naive_ratio_at(toy_mean_steps, rep.step, rep.decoder_from_sc, ar_total, r, link_depth)
    return DepthTable(
        report=rep,
        rows=rows,
        paper_ratio=paper_ratio,
        steps_to_paper=solved,
        whole_steps_to_paper=math.ceil(solved) if math.isfinite(solved) else math.inf,
        toy_mean_steps=toy_mean_steps,
        toy_ratio=toy_ratio,
        link_depth=link_depth,
    )


def depth_table(
    config: str | Path | dict[str, Any] | None = None,
    steps: int = 48,
    prompt_len: int = 1024,
    toy_mean_steps: float | None = None,
    paper_ratio: float = PAPER_NAIVE_RATIO,
    readout_k: int = 64,
) -> DepthTable:
    """Traces ``config`` (default: the shipped 26B-A4B) with :func:`report` and builds the depth table."""
    rep = report(config, prompt_len=prompt_len, steps=steps, readout_k=readout_k)
    return build_depth_table(rep, steps=steps, toy_mean_steps=toy_mean_steps, paper_ratio=paper_ratio)


def format_depth_table(table: DepthTable) -> str:
    """The text ``diffusionlens depth`` prints."""
    rep, s = table.report, table.report.settings
    lines = [
        "Opaque serial depth: DiffusionGemma vs autoregressive Gemma 4",
        f"config: {s.get('config')}  prompt_len={s.get('prompt_len')}  canvas={s.get('canvas_length')}  "
        f"readout=top-{s.get('readout_k')}  (traced in {s.get('seconds', 0.0):.1f}s)",
        "",
        "pass depths (from interpretable inputs to logits)",
    ]
    passes = [
        ("AR Gemma 4 pass over prompt+canvas tokens (D_ar)", rep.ar),
        ("encoder pass, prompt tokens -> deepest KV cache entry", rep.encoder),
        ("decoder pass from canvas tokens + self-conditioning input", rep.decoder),
        ("decoder pass from self-conditioning logits (D_sc)", rep.decoder_from_sc),
        ("diffusion step, encoder + decoder from tokens (D_step)", rep.step),
        ("readout, logits -> top-k distribution (R)", rep.readout),
    ]
    lines += [f"  {label:<58} {d:>8}" for label, d in passes]
    lines += [
        "",
        "opaque depth of a generation (every chain ends in the readout R)",
        f"  {'model':<46} {'steps':>5} {'depth':>9} {'x AR':>7}",
    ]
    for row in table.rows:
        n = "-" if row.steps is None else str(row.steps)
        lines.append(f"  {row.label:<46} {n:>5} {row.depth:>9} {row.ratio:>6.2f}x")
    ar_total, link = rep.ar + rep.readout, table.link_depth
    lines += [
        "",
        f"naive = D_step + (S-1)(link + D_sc) + R = {rep.step} + (S-1)*{link + rep.decoder_from_sc} + {rep.readout}; "
        f"AR = D_ar + R = {ar_total}",
    ]
    p, solved, whole = table.paper_ratio, table.steps_to_paper, table.whole_steps_to_paper
    if math.isfinite(solved):
        at_whole = naive_ratio_at(whole, rep.step, rep.decoder_from_sc, ar_total, rep.readout, link)
        lines.append(
            f"naive ratio reaches the paper's {p:g}x at S = {solved:.2f} steps "
            f"(first whole step count: {whole}, {at_whole:.2f}x)"
        )
    else:
        lines.append(f"naive ratio never reaches the paper's {p:g}x (the chain does not grow with S)")
    if table.toy_mean_steps is None:
        lines.append("toy model mean denoising steps: not given (--toy-mean-steps)")
    else:
        lines.append(
            f"toy model mean denoising steps: {table.toy_mean_steps:g} "
            f"(naive ratio at that S: {table.toy_ratio:.2f}x; S for {p:g}x: {solved:.2f})"
        )
    return "\n".join(lines)
