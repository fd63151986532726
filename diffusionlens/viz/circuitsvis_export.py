"""Decoder attention as circuitsvis's `attention_heads` view, for notebooks and as an offline HTML file.

circuitsvis draws square patterns over one token list, so the tokens are the labelled keys (`p12:a`
prompt, `c3:4` canvas) and each canvas query is the row of its own canvas key (`square_attention`);
rows of prompt keys are zero (the decoder asks no questions from the prompt). The canvas attends both
ways, so the view is drawn with `mask_upper_tri=False`: circuitsvis's default (causal) mask would hide
every canvas key after the query's own.

circuitsvis writes its props (the token labels among them) into a `<script>` as plain JSON, where a
token such as `</script>` would end the element; both of its sources are rewritten here with the
props as script-safe JSON (`<`, `>`, `&` escaped).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffusionlens.viz.attention import labelled_pattern, square_attention
from diffusionlens.viz.html_page import script_safe_json, write_page

if TYPE_CHECKING:
    from circuitsvis.utils.render import RenderedHTML

    from diffusionlens.cache.denoising import DenoisingCache
    from diffusionlens.model import HookedDiffusionGemma
    from diffusionlens.sampling.trace import DenoisingTrace


def attention_circuitsvis(
    cache: DenoisingCache,
    trace: DenoisingTrace,
    *,
    step: int,
    layer: int,
    model: HookedDiffusionGemma | None = None,
    **labelling: Any,
) -> RenderedHTML:
    """circuitsvis's `attention_heads` view of one decoder layer at one step, unmasked (display it in a
    notebook). Its `local_src` carries circuitsvis's JavaScript inline and works offline (what
    `write_attention_circuitsvis` saves); `str(view)` is circuitsvis's CDN version, which needs the
    network. `model` defaults to the cache's; `labelling` is `attention_labels`'s keywords (`tokens=` and,
    as needed, `attention_mask`, `canvas`, `row`, `tokenizer`)."""
    try:
        from circuitsvis.attention import attention_heads
        from circuitsvis.utils.render import RenderedHTML
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("attention_circuitsvis needs circuitsvis: pip install 'diffusionlens[viz]'") from err
    model = model if model is not None else cache.model
    if model is None:
        raise ValueError("pass model=: this cache does not hold its model")
    pattern, keys = labelled_pattern(model, cache, trace, step, layer, **labelling)
    labels = keys.labels()
    head_names = [f"L{layer}H{head}" for head in range(pattern.shape[0])]
    square = square_attention(pattern, keys)
    view = attention_heads(
        attention=square,
        tokens=labels,
        attention_head_names=head_names,
        mask_upper_tri=False,
    )
    # the props exactly as attention_heads passes them (its keyword order; None values dropped)
    props = {"attention": square.tolist(), "attentionHeadNames": head_names}
    props.update({"tokens": labels, "maskUpperTri": False})
    return RenderedHTML(_script_safe_props(view.local_src, props), _script_safe_props(view.cdn_src, props))


def write_attention_circuitsvis(path: str | Path, view: RenderedHTML, title: str = "attention (circuitsvis)") -> Path:
    """Save `view` (from `attention_circuitsvis`) as one HTML file that opens offline: circuitsvis's
    JavaScript is inline (its `local_src`), nothing is fetched."""
    page = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title, quote=True)}</title></head>\n<body>\n{view.local_src}\n</body></html>\n"
    )
    return write_page(path, page)


def _script_safe_props(source: str, props: dict[str, Any]) -> str:
    """`source` with circuitsvis's JSON of `props` replaced by script-safe JSON of the same values."""
    plain = json.dumps(props)
    if source.count(plain) != 1:
        raise RuntimeError(
            "circuitsvis's attention_heads no longer writes its props as diffusionlens expects (a circuitsvis "
            "version change?); the export cannot make its token labels script-safe. Pin circuitsvis>=1.43,<2."
        )
    return source.replace(plain, script_safe_json(props))
