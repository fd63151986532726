"""The HTML view of an attribution graph across denoising steps: one self-contained page (inline CSS, JS and
JSON; no network) in the style and with the safety rules of the trajectory viewer (`viz.html_page`).

Steps are columns, left to right, after a column of prompt tokens and before the target logit's column at
the right; within a step, layers are rows (each step's canvas tokens at the bottom, the last layer at the
top) and positions run left to right. The page reads circuit-tracer's graph document as `Graph.to_json`
writes it (with `step`, `kind`, `position` and `token` on its nodes), from a `Graph` or from the file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from diffusionlens.graphs.graph import KINDS, Graph
from diffusionlens.viz._common import TokenDecoder, token_texts
from diffusionlens.viz.html_page import page_header, page_script, read_asset, render_page, write_page

#: The strongest links of a node the details panel lists, each way.
TOP_LINKS = 8


def graph_document(graph: Graph | dict | str | Path, *, node_threshold: float | None, edge_threshold: float) -> dict:
    """circuit-tracer's graph document of `graph`: a `Graph` (pruned with the thresholds, as `to_json` does),
    the dict `Graph.json_document` returns, or the path of a file `Graph.to_json` wrote (as written)."""
    if isinstance(graph, Graph):
        return graph.json_document(node_threshold=node_threshold, edge_threshold=edge_threshold)
    if isinstance(graph, (str, Path)):
        document = json.loads(Path(graph).read_text(encoding="utf-8"))
    elif isinstance(graph, dict):
        document = graph
    else:
        raise TypeError(f"expected a Graph, a graph document (dict) or a graph JSON path; got {type(graph).__name__}")
    nodes = document.get("nodes") if isinstance(document, dict) else None
    if not isinstance(nodes, list) or "links" not in document:
        raise ValueError("not a graph document: it needs `nodes` and `links` (write one with Graph.to_json)")
    missing = [key for key in ("node_id", "step", "kind", "position") if nodes and key not in nodes[0]]
    if missing or any(node.get("kind") not in KINDS for node in nodes):
        raise ValueError(
            f"not a diffusionlens graph file: every node needs `step`, `kind` (one of {KINDS}) and `position` "
            f"(missing {missing}); circuit-tracer's own files have no steps. Write it with Graph.to_json"
        )
    return document


def graph_view_data(
    graph: Graph | dict | str | Path,
    tokenizer: TokenDecoder = None,
    *,
    title: str | None = None,
    node_threshold: float | None = 0.8,
    edge_threshold: float = 0.98,
) -> dict[str, Any]:
    """The JSON-ready dict the graph page reads: one entry per node (kind, step, layer, position, feature,
    token text, activation, influence), links as `[source, target, weight]` over node indices (weakest first,
    so the strongest are drawn on top), and the layout's sizes (steps, layers, canvas and prompt lengths)."""
    document = graph_document(graph, node_threshold=node_threshold, edge_threshold=edge_threshold)
    meta = document.get("metadata", {}).get("diffusionlens", {})
    raw = document["nodes"]
    index = {node["node_id"]: i for i, node in enumerate(raw)}
    if len(index) != len(raw):
        raise ValueError("the graph document repeats a node_id; links could not be placed")
    ids = sorted({int(node["token"]) for node in raw if node.get("token") is not None})
    ids += sorted({int(t) for t, _ in meta.get("target", {}).get("tokens", [])} - set(ids))
    texts = dict(zip(ids, token_texts(tokenizer, ids), strict=True))
    n_layers = int(
        meta.get("n_layers", 1 + max((_layer(n) for n in raw if n["kind"] in ("feature", "error")), default=-1))
    )
    nodes = [_node(node, texts, n_layers) for node in raw]
    links = []
    for link in document["links"]:
        source, target = index.get(link["source"]), index.get(link["target"])
        if source is None or target is None:
            raise ValueError(f"link {link['source']} -> {link['target']} names a node the document does not have")
        links.append([source, target, _finite(link["weight"])])
    links.sort(key=lambda link: abs(link[2]))
    steps = [node["step"] for node in nodes if node["kind"] != "prompt"]
    target = meta.get("target", {})
    target_text = " ".join(
        ("" if i == 0 and sign > 0 else "+ " if sign > 0 else "− ") + f"logit({texts.get(int(t), str(t))})"
        for i, (t, sign) in enumerate(target.get("tokens", []))
    )
    positions = [node["position"] for node in nodes if node["kind"] != "prompt"]
    default_title = f"attribution graph of {target_text or 'the target'}"
    if target:
        default_title += f" at position {target.get('position')}, step {target.get('step')}"
    return {
        **page_header(title, default_title, int(meta.get("canvas", 0)), 0),
        "prompt": str(document.get("metadata", {}).get("prompt", "")),
        "n_steps": int(meta.get("n_steps", 1 + max(steps, default=-1))),
        "n_layers": n_layers,
        "canvas_length": int(meta.get("canvas_length", 1 + max(positions, default=-1))),
        "prompt_length": int(meta.get("prompt_length", sum(node["kind"] == "prompt" for node in nodes))),
        "target": target_text,
        "top_links": TOP_LINKS,
        "nodes": nodes,
        "links": links,
    }


def _layer(node: dict) -> int:
    return int(node["layer"]) if str(node["layer"]).lstrip("-").isdigit() else -1


def _finite(value: Any) -> float | None:
    value = float(value) if value is not None else math.nan
    return value if math.isfinite(value) else None


def _node(node: dict, texts: dict[int, str], n_layers: int) -> dict[str, Any]:
    """One node for the page; `layer` is -1 for token and prompt nodes and `n_layers` for the logit."""
    kind = node["kind"]
    layer = -1 if kind in ("token", "prompt") else n_layers if kind == "logit" else _layer(node)
    token = node.get("token")
    return {
        "id": str(node["node_id"]),
        "kind": kind,
        "step": int(node["step"]),
        "layer": layer,
        "position": int(node["position"]),
        "feature": int(node["feature"]) if kind == "feature" else None,
        "token": None if token is None else int(token),
        "text": None if token is None else texts[int(token)],
        "activation": _finite(node.get("activation")) if kind == "feature" else None,
        "influence": _finite(node.get("influence")),
    }


def render_graph_view(graph: Graph | dict | str | Path, tokenizer: TokenDecoder = None, **options: Any) -> str:
    """An attribution graph (a `Graph`, its `json_document`, or a file `Graph.to_json` wrote) as a
    self-contained HTML page. A `Graph` is pruned with the thresholds first (`node_threshold=None`: every node);
    a document or file is shown as it is.

    The SVG (`#graph`) has a column per step (`.column[data-step]`, headed `step s`) between the prompt's column
    (`data-step="-1"`) and the target's (`data-step="target"`); within a column, layer rows (`.row-label`: `E`
    for the tokens, `L0`, `L1`, ... upwards) and canvas positions left to right. Nodes
    (`.node[data-node][data-kind][data-step][data-layer][data-position]`) are drawn by kind: features as circles,
    error nodes as grey diamonds, canvas and prompt tokens as labelled squares (green, purple), the target logit
    as a red square at the right. Links (`.link[data-source][data-target][data-weight]`) are blue when
    positive, red when negative, wider and darker the stronger. Hovering a node shows what it is (`#tooltip`);
    clicking it selects it (`.selected`), highlights its links and fills `#details` with its kind, step, layer,
    position, feature, token, activation and influence and its strongest incoming and outgoing links
    (`.link-row[data-node]`, up to `TOP_LINKS` each; click one to select that node). The `#threshold` slider hides
    links whose |weight| is below that fraction of the largest (`.link.hidden`); `#link-count` says how many show.
    `tokenizer` turns token ids into text (as in `render_viewer`); `options` are `graph_view_data`'s (`title`
    and the thresholds).
    """
    data = graph_view_data(graph, tokenizer, **options)
    return render_page(_BODY, title=data["title"], style=_STYLE, script=_SCRIPT, data=data, data_id="graph-data")


def write_graph_view(
    graph: Graph | dict | str | Path, path: str | Path, tokenizer: TokenDecoder = None, **kw: Any
) -> Path:
    """Write `render_graph_view(graph, tokenizer, **kw)` to `path` (UTF-8) and return the path."""
    return write_page(path, render_graph_view(graph, tokenizer, **kw))


_BODY = read_asset("graph_view.html")

_STYLE = read_asset("graph_view.css")

_SCRIPT = page_script("graph-data", read_asset("graph_view.js"))
