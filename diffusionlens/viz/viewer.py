"""The HTML trajectory viewer: one self-contained file (inline CSS, JS and JSON; no network) with a step
slider over one canvas of a DenoisingTrace.

Token text never reaches the page as markup: `viz.html_page` (the frame every page shares) carries the
data as script-safe JSON, builds every element with `textContent` and sets a Content-Security-Policy
that allows no network access and only the viewer's own script (by hash).
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffusionlens.sampling.trace import TOKEN_FIELDS, CanvasTrace, DenoisingTrace
from diffusionlens.viz._common import RowView, TokenDecoder, token_texts
from diffusionlens.viz.dla import MAX_COMPONENTS, dla_title, shown_components
from diffusionlens.viz.feature_panel import (
    FEATURES_HTML,
    FEATURES_SCRIPT,
    FEATURES_STYLE,
    FeaturePanel,
    feature_panel_data,
)
from diffusionlens.viz.html_page import page_csp as page_csp  # moved to html_page; importable here as before
from diffusionlens.viz.html_page import page_header, page_script, read_asset, render_page, write_page
from diffusionlens.viz.html_page import script_safe_json as script_safe_json  # likewise

if TYPE_CHECKING:
    from diffusionlens.analysis.dla import DLAByStep


def _round(value: float, digits: int) -> float | None:
    value = float(value)
    return round(value, digits) if math.isfinite(value) else None


def viewer_data(
    trace: DenoisingTrace | CanvasTrace,
    tokenizer: TokenDecoder = None,
    *,
    canvas: int = 0,
    row: int = 0,
    title: str | None = None,
    dla: DLAByStep | None = None,
    features: FeaturePanel | None = None,
) -> dict[str, Any]:
    """The JSON-ready dict the viewer page reads: per-step token ids of every field, entropy, accepted
    flags, top-k (when recorded), commit steps, the DLA and feature panels' data when given, and the
    text of every token id that appears."""
    prompt_length = trace.prompt_length if isinstance(trace, DenoisingTrace) else None
    view = RowView.select(trace, canvas, row)
    ct, n_steps = view.trace, view.n_steps
    fields = {name: view.per_step(name).tolist() for name in TOKEN_FIELDS}
    entropy = view.per_step("entropy").float()
    finite = entropy[entropy.isfinite()]
    top_tokens = top_probs = None
    if ct.top_k_tokens is not None and ct.top_k_probs is not None:
        top_tokens = ct.top_k_tokens[:n_steps, row].tolist()
        top_probs = [[[_round(p, 4) for p in ps] for ps in step] for step in ct.top_k_probs[:n_steps, row].tolist()]
    ids = {i for rows in fields.values() for step in rows for i in step}
    if top_tokens is not None:
        ids |= {i for step in top_tokens for ks in step for i in ks}
    panel = None
    if features is not None:
        panel, panel_ids = feature_panel_data(features, ct, canvas=canvas, row=row, n_steps=n_steps)
        ids |= panel_ids
    ordered = sorted(ids)
    texts = dict(zip((str(i) for i in ordered), token_texts(tokenizer, ordered), strict=True))
    return {
        **page_header(title, f"canvas {canvas}, row {row}", canvas, row),
        "prompt_length": prompt_length,
        "n_steps": n_steps,
        "length": ct.input_canvas.shape[-1],
        "k": 0 if top_tokens is None else len(top_tokens[0][0]),
        "text": texts,
        "fields": fields,
        "entropy": [[_round(e, 4) for e in step] for step in entropy.tolist()],
        "max_entropy": _round(float(finite.max()), 4) if finite.numel() else 0.0,
        "accepted": view.per_step("accepted").int().tolist(),
        "finished": ct.finished[:n_steps, row].tolist(),
        "temperature": [_round(v, 4) for v in ct.temperature[:n_steps].tolist()],
        "t": ct.t[:n_steps].tolist(),
        "top_k_tokens": top_tokens,
        "top_k_probs": top_probs,
        "commit": view.commit_steps().tolist(),
        "final": ct.argmax[n_steps - 1, row].tolist(),
        "dla": None if dla is None else _dla_data(dla, tokenizer, canvas, row),
        "features": panel,
    }


def _dla_data(dla: DLAByStep, tokenizer: TokenDecoder, canvas: int, row: int) -> dict[str, Any]:
    """The DLA panel's data: one row per step, one column per component (at most `MAX_COMPONENTS` and
    `rest`), and which columns start a new block."""
    if (dla.canvas, dla.row) != (canvas, row):
        raise ValueError(f"the DLA table is of canvas {dla.canvas}, row {dla.row}; the viewer shows {canvas}, {row}")
    dla, note = shown_components(dla, MAX_COMPONENTS)
    layers = dla.layers
    return {
        "title": "direct logit attribution: " + dla_title(dla, tokenizer) + note,
        "position": dla.position,
        "labels": dla.labels,
        "block_start": [layer is not None and (i == 0 or layer != layers[i - 1]) for i, layer in enumerate(layers)],
        "steps": dla.steps,
        "values": [[_round(v, 4) for v in step] for step in dla.attributions.tolist()],
        "logit": [_round(v, 4) for v in dla.logit.tolist()],
        "max_abs": _round(float(dla.attributions.abs().max()), 4),
    }


def render_viewer(
    trace: DenoisingTrace | CanvasTrace, tokenizer: TokenDecoder = None, *, step: int = 0, **options: Any
) -> str:
    """The viewer for one canvas and batch row of `trace`, as a self-contained HTML page.

    A step slider (`#step-slider`, also arrow keys and play) shows the canvas at each step: by default
    the draft answer (argmax), or the sampled tokens, the canvas the decoder read, or the canvas after
    renoising (`#view-select`). Each position (`.cell[data-position]` holding `.token[data-position]`) is
    coloured by its entropy at that step, outlined when accepted at that step, and labels its commit
    step (`.commit`). Hovering a position shows its top-k tokens and probabilities (`#tooltip`) when the
    trace was generated with `record_top_k`. `tokenizer` turns ids into text (an object with `decode`,
    a callable id -> str, or None for ids); `step` is the step shown first. `options` are `viewer_data`'s
    (`canvas`, `row`, `title`, `dla`, `features`). Steps run to the one after which the row stopped.

    With `dla` (a `dla_by_step` table of the same canvas and row) a panel (`#dla`) shows it as a step ×
    component heatmap (`.dla-cell[data-step][data-component]`), the slider's step highlighted, and the
    position it attributes outlined on the canvas. Either granularity of `dla_by_step` shows (blocks are
    separated by a rule); a table of more than `viz.dla.MAX_COMPONENTS` components shows the largest
    and a `rest` column (`DLAByStep.keep_top`), as the title says.

    With `features` (a `FeaturePanel` of SAE feature activations recorded by `generate_with_sae` in the
    same run, and/or `top_activations` examples from a store) a panel (`#features`) shows one feature at a
    time (`#feature-select`): its activation across steps at the positions where it fires most (a chart
    and `.feature-value[data-step][data-position]` cells), the run's strongest (step, position) examples
    with the canvas read around them (`.run-example`, click to jump to that step), the store's top
    examples with prompt, seed, step, position and token context (`.store-example`) and the store's mean
    activation when it fires and its firing rate per step; a bar under each canvas position
    (`.feature-act`) shows the activation at the slider's step.
    """
    data = viewer_data(trace, tokenizer, **options)
    if not 0 <= step < data["n_steps"]:
        raise IndexError(
            f"step {step} out of range: row {data['row']} of canvas {data['canvas']} has {data['n_steps']} steps"
        )
    fields = {"@MAX_STEP@": str(data["n_steps"] - 1), "@STEP@": str(step), "@VIEW_OPTIONS@": _view_options()}
    fields["@FEATURES@"] = FEATURES_HTML
    return render_page(
        _BODY, title=data["title"], style=_STYLE, script=_SCRIPT, data=data, data_id="trace-data", fields=fields
    )


def _view_options() -> str:
    """One `<option>` per token field of the trace; the first (the draft answer) is shown first."""
    return "\n".join(
        f'<option value="{name}"{" selected" if i == 0 else ""}>{html.escape(label)}</option>'
        for i, (name, label) in enumerate(TOKEN_FIELDS.items())
    )


def write_viewer(trace: DenoisingTrace | CanvasTrace, tokenizer: TokenDecoder, path: str | Path, **kw: Any) -> Path:
    """Write `render_viewer(trace, tokenizer, **kw)` to `path` (UTF-8) and return the path."""
    return write_page(path, render_viewer(trace, tokenizer, **kw))


_BODY = read_asset("viewer.html")

_STYLE = read_asset("viewer.css") + FEATURES_STYLE

_SCRIPT = page_script(
    "trace-data",
    read_asset("viewer.js").replace("/*@FEATURES@*/", FEATURES_SCRIPT),
)
