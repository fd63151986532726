"""The runtime type checker the tests wrap `diffusionlens` in (see conftest.py).

It checks the annotations that carry a jaxtyping array type (tensor shapes and dtypes, alone or inside
a union, list, tuple or dict) and nothing else. Plain annotations (`int`, `str`, a callable, a
literal) are left to the library's own validation, so a test that feeds bad input still meets the
library's message, which names the fix, rather than the checker's. PEP 484's numeric tower is on, so
an `int` passes where a `float` is annotated inside a checked annotation, as a static checker allows.
"""

from __future__ import annotations

import typing

from beartype import BeartypeConf, beartype
from jaxtyping._array_types import AbstractArray

_beartype = beartype(conf=BeartypeConf(is_pep484_tower=True))


def mentions_array_type(annotation: object) -> bool:
    """Whether a (destringed) annotation is, or contains, a jaxtyping array type."""
    if isinstance(annotation, type) and issubclass(annotation, AbstractArray):
        return True
    return any(mentions_array_type(argument) for argument in typing.get_args(annotation))


def tensor_beartype(function):
    """Beartype `function` over its array-typed annotations only (jaxtyping's `typechecker=` hook)."""
    annotations = getattr(function, "__annotations__", None)
    if isinstance(annotations, dict):
        for name in [name for name, annotation in annotations.items() if not mentions_array_type(annotation)]:
            del annotations[name]
    return _beartype(function)
