"""The HTML attention viewer: decoder attention patterns of one generation as one self-contained page
(inline CSS, JS and JSON; no network), in the style and with the safety rules of the trajectory viewer:
token text travels as script-safe JSON and reaches the page only through `textContent`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Int

from diffusionlens.cache.selectors import resolve_layers
from diffusionlens.sampling.trace import DenoisingTrace
from diffusionlens.viz._common import TokenDecoder
from diffusionlens.viz.attention import labelled_pattern, pattern_hook
from diffusionlens.viz.html_page import page_header, page_script, read_asset, render_page, write_page

if TYPE_CHECKING:
    from diffusionlens.cache.denoising import DenoisingCache
    from diffusionlens.model import HookedDiffusionGemma


def attention_viewer_data(
    model: HookedDiffusionGemma,
    cache: DenoisingCache,
    trace: DenoisingTrace,
    *,
    tokens: Int[torch.Tensor, "batch length"],
    attention_mask: Bool[torch.Tensor, "batch prompt"] | Int[torch.Tensor, "batch prompt"] | None = None,
    layers: Sequence[int] | None = None,
    steps: Sequence[int] | None = None,
    canvas: int = 0,
    row: int = 0,
    tokenizer: TokenDecoder = None,
    title: str | None = None,
) -> dict[str, Any]:
    """The JSON-ready dict the attention page reads. Layers default to every decoder layer whose pattern
    was recorded, steps to every recorded step the trace ran; weights are rounded to 4 decimals."""
    if layers is None:
        layers = [layer for layer in range(model.cfg.num_hidden_layers) if pattern_hook(layer) in cache]
    if steps is None:
        steps = [s for s in cache.steps(canvas) if s < trace[canvas].n_steps]
    layers = resolve_layers(layers, model.cfg.num_hidden_layers)
    steps = [int(s) for s in steps]
    if not layers or not steps:
        raise ValueError(
            "no attention to show: record 'decoder.blocks.{l}.attn.hook_pattern' for some layer and step "
            f"(layers {layers}, steps {steps})"
        )
    prompt_keys: dict[str, Any] = {}
    patterns: dict[str, list] = {}
    canvas_texts: list[list[str]] = []
    for layer in layers:
        per_step = []
        for index, step in enumerate(steps):
            pattern, keys = labelled_pattern(
                model, cache, trace, step, layer, tokens=tokens, attention_mask=attention_mask, canvas=canvas,
                row=row, tokenizer=tokenizer,
            )  # fmt: skip
            per_step.append(pattern.round(decimals=4).tolist())
            n_prompt = keys.n_prompt
            prompt_keys[str(layer)] = {
                "texts": keys.texts[:n_prompt],
                "positions": keys.positions[:n_prompt],
                "padding": keys.padding[:n_prompt],
            }
            if len(canvas_texts) == index:
                canvas_texts.append(keys.texts[n_prompt:])
        patterns[str(layer)] = per_step
    return {
        **page_header(title, f"attention, canvas {canvas}, row {row}", canvas, row),
        "layers": layers,
        "steps": steps,
        "heads": {str(layer): len(patterns[str(layer)][0]) for layer in layers},
        "sliding": {str(layer): bool(model.cfg.is_sliding(layer)) for layer in layers},
        "prompt_keys": prompt_keys,
        "canvas_texts": canvas_texts,
        "patterns": patterns,
    }


def render_attention_viewer(
    model: HookedDiffusionGemma, cache: DenoisingCache, trace: DenoisingTrace, **options: Any
) -> str:
    """Decoder attention patterns as a self-contained HTML page: choose the layer (`#layer-select`), head
    (`#head-select`) and step (`#step-slider`); the grid (`#pattern`) has one row per canvas query
    (`.query-label`) and one column per key (`.key-label`: the prompt keys the layer keeps, then the
    canvas the step read), each `.att-cell[data-query][data-key]` shaded by its weight. Hovering a cell
    or key label shows the query, the key (prompt/canvas position, padding) and the weight (`#tooltip`).

    `options` are `attention_viewer_data`'s (`tokens=` and `attention_mask` as in `attention_labels`, the
    `layers`, `steps`, `canvas`, `row`, `tokenizer`, `title`); the cache must hold
    `decoder.blocks.{l}.attn.hook_pattern` for the layers and steps shown.
    """
    data = attention_viewer_data(model, cache, trace, **options)
    fields = {"@MAX_STEP@": str(len(data["steps"]) - 1)}
    return render_page(
        _BODY, title=data["title"], style=_STYLE, script=_SCRIPT, data=data, data_id="attention-data", fields=fields
    )


def write_attention_viewer(
    model: HookedDiffusionGemma, cache: DenoisingCache, trace: DenoisingTrace, path: str | Path, **kw: Any
) -> Path:
    """Write `render_attention_viewer(model, cache, trace, **kw)` to `path` (UTF-8) and return the path."""
    return write_page(path, render_attention_viewer(model, cache, trace, **kw))


_BODY = read_asset("attention.html")

_STYLE = read_asset("attention.css")

_SCRIPT = page_script(
    "attention-data",
    read_asset("attention.js"),
)
