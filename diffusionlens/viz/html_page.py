"""The frame every HTML page of diffusionlens shares (the trajectory viewer, the attention viewer): one
self-contained file with inline CSS, JS and JSON and no network access.

The safety rules live here, once: the data travel as JSON inside a `<script type="application/json">`
whose `<`, `>` and `&` are `\\u` escapes (so no token can close the script element), the page builds
every element with `textContent` (`el` below), and a Content-Security-Policy allows no network access
and only the page's own script (by hash). Each page brings its body, style, script and data; the
markup, style and script themselves are files under `viz/assets/`.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
from importlib.resources import files
from pathlib import Path
from typing import Any


def read_asset(name: str) -> str:
    """The text of `diffusionlens/viz/assets/<name>`: a page's HTML, CSS or JS, kept as package data (files an
    editor and a linter read as what they are) and shipped in the wheel by pyproject's package-data."""
    return files("diffusionlens.viz").joinpath("assets").joinpath(name).read_text(encoding="utf-8")


_HEAD = read_asset("page_head.html")

_TAIL = read_asset("page_tail.html")

# The script's opening: strict mode, the page's data, and the helpers every page uses. `el` is the only
# way a page makes an element, so token text reaches the DOM as `textContent`, never as markup.
_SCRIPT_START = read_asset("page_script_start.js")

_SCRIPT_END = read_asset("page_script_end.js")


def script_safe_json(data: Any) -> str:
    """JSON that is safe inside a `<script>` element: `<`, `>`, `&` (and every non-ASCII character,
    U+2028/2029 included) are `\\u` escapes, so the text can never close the element or open a comment."""
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def page_csp(script: str) -> str:
    """A Content-Security-Policy that allows no network access and runs only `script` (by its hash)."""
    script_hash = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    return (
        "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
        f"script-src 'sha256-{script_hash}'; connect-src 'none'; form-action 'none'; base-uri 'none'"
    )


def page_header(title: str | None, default_title: str, canvas: int, row: int) -> dict[str, Any]:
    """What every page's data starts with: its title (`default_title` unless given) and the canvas and
    batch row it shows (the script's `#meta` line reads them)."""
    return {"title": title if title is not None else default_title, "canvas": canvas, "row": row}


def page_script(data_id: str, body: str) -> str:
    """A page's script: `body` (JS that reads `data` and may call `el`, `clear(node)` and `showTooltipBelow(target)`)
    wrapped in the shared opening and closing; the page marks itself ready (`body[data-ready]`) at the end."""
    return _SCRIPT_START.replace("@DATA_ID@", data_id) + body + _SCRIPT_END


def render_page(
    body: str,
    *,
    title: str,
    style: str,
    script: str,
    data: Any,
    data_id: str,
    fields: dict[str, str] | None = None,
) -> str:
    """One HTML page: the shared head (title, `#meta`), `body`, the tooltip, the data as script-safe JSON
    under `#data_id`, and `script`. `fields` fills the body's own `@NAME@` placeholders (trusted markup)."""
    replacements = {
        "@CSP@": page_csp(script),  # no quotes or markup in it
        "@TITLE@": html.escape(title, quote=True),
        "@STYLE@": style,
        "@DATA@": script_safe_json(data),
        "@SCRIPT@": script,
        **(fields or {}),
    }
    template = _HEAD + body + _TAIL.replace("@DATA_ID@", data_id)
    # one pass, so nothing substituted (a title, the data) is scanned for placeholders again
    return re.sub(r"@[A-Z_]+@", lambda match: replacements[match.group(0)], template)


def write_page(path: str | Path, page: str) -> Path:
    """Write `page` to `path` (UTF-8, creating its folder) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
