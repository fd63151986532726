"""The getting-started snippet in the docs runs as written."""

from __future__ import annotations

import re
from pathlib import Path


def test_getting_started_snippet_runs(capsys):
    page = (Path(__file__).parents[1] / "docs" / "getting_started.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", page, flags=re.S).group(1)
    assert len(snippet.strip().splitlines()) <= 12
    exec(compile(snippet, "getting_started.md", "exec"), {})
    out = capsys.readouterr().out
    assert "torch.Size([" in out and " -> " in out
