"""The runtime checker the test run wraps `diffusionlens` in (tests/typecheck.py, on in CI).

It must catch a tensor whose shape or dtype contradicts an annotation, and must leave every other
annotation to the library's own validation, whose messages name the fix.
"""

from __future__ import annotations

import os

import pytest
import torch
from jaxtyping import Bool, Float, Int, TypeCheckError, jaxtyped
from reference import build_pair
from typecheck import mentions_array_type, tensor_beartype

CHECKS_ON = os.environ.get("DIFFUSIONLENS_TYPECHECK") == "1"


def test_only_array_annotations_count_as_tensor_annotations():
    assert mentions_array_type(Float[torch.Tensor, "batch pos"])
    assert mentions_array_type(Int[torch.Tensor, "b"] | None)
    assert mentions_array_type(dict[str, list[Bool[torch.Tensor, "b c"]]])
    assert not mentions_array_type(int)
    assert not mentions_array_type(str | None)
    assert not mentions_array_type(torch.Tensor)  # unannotated shape: nothing to check


def test_checker_checks_shapes_and_dtypes_and_leaves_plain_arguments_alone():
    @jaxtyped(typechecker=tensor_beartype)
    def first_rows(x: Float[torch.Tensor, "batch d"], rows: int) -> Float[torch.Tensor, " d"]:
        if not isinstance(rows, int):
            raise TypeError("rows must be an int, e.g. rows=1")
        return x[:rows].sum(0)

    assert first_rows(torch.ones(3, 2), 1).shape == (2,)
    with pytest.raises(TypeCheckError):
        first_rows(torch.ones(3), 1)  # wrong rank
    with pytest.raises(TypeCheckError):
        first_rows(torch.ones(3, 2, dtype=torch.long), 1)  # wrong dtype
    with pytest.raises(TypeError, match="rows=1"):
        first_rows(torch.ones(3, 2), 1.5)  # not the checker's business: the function's own message


@pytest.mark.skipif(not CHECKS_ON, reason="the library is wrapped only with DIFFUSIONLENS_TYPECHECK=1 (as in CI)")
def test_library_is_wrapped_when_checks_are_on():
    model = build_pair("mixed", seed=1)[1]
    with pytest.raises(TypeCheckError, match="canvas_ids"):
        model(torch.tensor([[3, 4]]), torch.zeros(8, dtype=torch.long))  # canvas without its batch axis
    with pytest.raises(TypeError, match="names_filter must be"):  # a plain argument: the library's message
        model.run_with_cache(torch.tensor([[3]]), torch.zeros(1, 8, dtype=torch.long), names_filter=3)
