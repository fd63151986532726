"""Names filters: which hook points a filter picks (a name, glob, regex, list of those, or predicate),
and the error that names the nearest hooks when it picks none. Hooks, caches, patches and the CLI
all resolve their filters here.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Iterable, Sequence

NameFilter = str | Callable[[str], bool] | Sequence[str] | None


def resolve_hook_names(names_filter: NameFilter, available: Iterable[str]) -> list[str]:
    """The names in `available` that `names_filter` picks, in `available`'s order for a glob or
    predicate: None (every name), an exact name, a glob (`decoder.blocks.*.hook_resid_post`), a
    regex (`decoder\\.blocks\\.(0|1)\\..*`), a list of those, or a predicate `fn(name) -> bool`.

    The one resolver behind every names filter (hooks, caches, patches, the CLI): a name or pattern
    that matches nothing, or a predicate that matches nothing, raises a KeyError naming the nearest
    hook names, because a typo that silently matches nothing would record or patch nothing.
    """
    available = list(available)
    if names_filter is None:
        return available
    if callable(names_filter):
        matched = [n for n in available if names_filter(n)]
        if not matched:
            raise KeyError(
                f"the names_filter predicate {getattr(names_filter, '__name__', names_filter)!r} matched no hook "
                "point; list them with sorted(model.hook_dict)"
            )
        return matched
    if isinstance(names_filter, str):
        patterns = [names_filter]
    elif isinstance(names_filter, Iterable):
        patterns = list(names_filter)
    else:
        raise TypeError(
            f"names_filter must be a hook name, glob, regex, list of those or a predicate, got {names_filter!r}"
        )
    out: list[str] = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"names_filter entries must be strings (names, globs or regexes), got {pattern!r}")
        matched = _matches(pattern, available)
        if not matched:
            raise KeyError(unknown_hook_message(pattern, available))
        out.extend(m for m in matched if m not in out)
    return out


def _matches(pattern: str, available: list[str]) -> list[str]:
    if pattern in available:
        return [pattern]
    matched = [n for n in available if fnmatch.fnmatchcase(n, pattern)]
    if not matched and re.search(r"[\^$+()|\\]", pattern):
        regex = re.compile(pattern)
        matched = [n for n in available if regex.fullmatch(n)]
    return matched


def unknown_hook_message(name: str, available: Iterable[str]) -> str:
    nearest = difflib.get_close_matches(name, list(available), n=5, cutoff=0.5)
    hint = f" Nearest names: {', '.join(nearest)}." if nearest else ""
    return (
        f"Unknown hook point '{name}'.{hint} "
        "List them all with sorted(model.hook_dict) or use a glob such as 'decoder.blocks.*.hook_resid_post'."
    )
