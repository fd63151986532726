"""Write docs/api_reference.md: the API reference as plain markdown, readable in the repository.

docs/api.md is the same list for the built site (mkdocstrings renders each `::: target` line there); this
script renders the same targets from their signatures and docstrings, so a reader on GitHub or in an editor
sees them too. `tests/integration/test_docs.py` checks the file is current.

    python scripts/api_reference.py            # rewrite docs/api_reference.md
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
API_PAGE = ROOT / "docs" / "api.md"
OUT = ROOT / "docs" / "api_reference.md"


def targets(page: str) -> list[str]:
    """The dotted names of the page's `::: target` lines, in order."""
    return re.findall(r"^::: ([\w.]+)\s*$", page, flags=re.M)


def resolve(dotted: str) -> object:
    """A module, or an attribute of the longest importable module prefix of `dotted`."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(f"{dotted} does not resolve")


def signature(obj: object) -> str:
    try:
        text = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""
    return re.sub(r" at 0x[0-9a-f]+", "", text)


def public_members(obj: object) -> list[tuple[str, object]]:
    """A class's public methods and properties, or a module's public functions and classes defined in it."""
    if inspect.ismodule(obj):
        names = getattr(obj, "__all__", None) or [n for n in vars(obj) if not n.startswith("_")]
        members = [(n, getattr(obj, n)) for n in names]
        return [(n, m) for n, m in members if getattr(m, "__module__", None) == obj.__name__ and callable(m)]
    members = []
    for name, member in vars(obj).items():
        if name.startswith("_") or not (callable(member) or isinstance(member, property)):
            continue
        members.append((name, member))
    # Properties a class takes from one of our mixins (a model's dtype and device) are part of its surface.
    own = {name for name, _ in members}
    for base in inspect.getmro(obj)[1:]:
        if not base.__module__.startswith("diffusionlens."):
            continue
        for name, member in vars(base).items():
            if isinstance(member, property) and not name.startswith("_") and name not in own:
                members.append((name, member))
                own.add(name)
    return members


def section(dotted: str, obj: object, level: int) -> list[str]:
    kind = "module" if inspect.ismodule(obj) else "class" if inspect.isclass(obj) else "function"
    shown = signature(obj) if kind == "function" or kind == "class" else ""
    lines = [f"{'#' * level} `{dotted}`{' (' + kind + ')' if kind != 'function' else ''}", ""]
    if shown:
        lines += ["```text", f"{dotted.rsplit('.', 1)[-1]}{shown}", "```", ""]
    doc = inspect.getdoc(obj)
    if doc:
        lines += [doc, ""]
    if kind != "function":
        for name, member in public_members(obj):
            target = member.fget if isinstance(member, property) else member
            member_doc = inspect.getdoc(target) or ""
            head = f"- `{name}{signature(target) if not isinstance(member, property) else ''}`"
            first = member_doc.split("\n\n")[0].replace("\n", " ")
            lines.append(f"{head}: {first}" if first else head)
        lines.append("")
    return lines


def render() -> str:
    lines = [
        "# API reference (plain text)",
        "",
        "<!-- written by scripts/api_reference.py from the targets of docs/api.md; do not edit by hand -->",
        "",
        "The targets of [the API reference](api.md), from their signatures and docstrings, readable without the",
        "built site.",
        "",
    ]
    for dotted in targets(API_PAGE.read_text()):
        lines += section(dotted, resolve(dotted), 2)
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    OUT.write_text(render())
    print(f"wrote {OUT.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
