"""Every Python block in README.md and docs/ runs as written, against the shipped toy model.

A page's blocks run in order in one namespace, in a fresh working directory, so a later block may use
what an earlier one defined. Two HTML comments, invisible in the rendered docs, steer this test:

- `<!-- docs-test: setup ... -->` right before a block holds code run first (e.g. loading the toy
  model), so a block can stay as short as the prose around it wants;
- `<!-- docs-test: skip REASON -->` right before a block skips it; the reason is reported (the real
  checkpoint, a GPU).
"""

from __future__ import annotations

import importlib.util
import linecache
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?P<comment><!-- docs-test:(?P<directive>.*?)-->\s*)?```python\n(?P<code>.*?)```", re.S)


@dataclass(frozen=True)
class DocBlock:
    page: str
    line: int
    code: str
    setup: str = ""
    skip_reason: str | None = None


def doc_blocks(page: Path) -> list[DocBlock]:
    text = page.read_text()
    blocks = []
    for match in BLOCK.finditer(text):
        directive = (match.group("directive") or "").strip()
        line = text.count("\n", 0, match.start("code"))
        setup, skip = "", None
        if directive.startswith("setup"):
            setup = directive.removeprefix("setup").strip("\n")
        elif directive.startswith("skip"):
            skip = directive.removeprefix("skip").strip() or "no reason given"
        elif directive:
            unknown = directive.split()[0]
            raise ValueError(f"{page.name}:{line}: unknown docs-test directive {unknown!r}; use setup or skip")
        blocks.append(DocBlock(page.relative_to(ROOT).as_posix(), line, match.group("code"), setup, skip))
    return blocks


PAGES_WITH_CODE = [page for page in PAGES if doc_blocks(page)]


def test_every_page_with_code_is_collected():
    assert any(page.name == "getting_started.md" for page in PAGES_WITH_CODE)
    for page in PAGES_WITH_CODE:
        for block in doc_blocks(page):
            assert block.skip_reason is None or len(block.skip_reason) > 10, f"{block.page}:{block.line}: say why"


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_page_code_runs(page: Path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    ran, skipped = 0, []
    for block in doc_blocks(page):
        if block.skip_reason is not None:
            skipped.append(f"{block.page}:{block.line} ({block.skip_reason})")
            continue
        source = block.setup + "\n" + block.code if block.setup else block.code
        filename = f"{block.page}:{block.line}"
        # as a file's code: tools that read their caller's source (nnsight's `with` blocks) find it here
        linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
        exec(compile(source, filename, "exec"), namespace)
        ran += 1
    if ran == 0:
        pytest.skip("every block is marked: " + "; ".join(skipped))


def test_getting_started_snippet_is_short_and_prints_the_patch():
    (block,) = doc_blocks(ROOT / "docs" / "getting_started.md")
    assert len(block.code.strip().splitlines()) <= 12


def test_getting_started_prints_a_shape_and_an_answer(capsys):
    (block,) = doc_blocks(ROOT / "docs" / "getting_started.md")
    exec(compile(block.code, "getting_started.md", "exec"), {})
    out = capsys.readouterr().out
    assert "torch.Size([" in out and " -> " in out


def test_the_plain_api_reference_is_current():
    """docs/api_reference.md (the API reference readable in the repository) matches what
    scripts/api_reference.py renders from docs/api.md's targets today."""
    script = ROOT / "scripts" / "api_reference.py"
    spec = importlib.util.spec_from_file_location("api_reference", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.targets((ROOT / "docs" / "api.md").read_text()), "docs/api.md lists no targets"
    written = (ROOT / "docs" / "api_reference.md").read_text()
    assert written == module.render(), "docs/api_reference.md is stale: run python scripts/api_reference.py"
