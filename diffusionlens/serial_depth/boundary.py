"""Interpretable-state boundaries.

Opaque serial depth measures chains *between* interpretable states. Wrapping a value in :func:`interpretable`
records a marker op in the traced graph; the calculator charges the chain that reaches the marker and restarts
the chain at depth 0 after it. Eagerly the marker is an identity (a copy, because a custom op may not return an
alias of its input), so instrumented code still runs normally.
"""

from __future__ import annotations

from typing import no_type_check

import torch
from jaxtyping import Shaped

__all__ = ["interpretable", "BOUNDARY_OP_NAME"]

BOUNDARY_OP_NAME = "serial_depth.interpretable"


# torch.library reads these signatures itself; no_type_check keeps a runtime type checker's wrapper
# (the tests install one) from hiding them.
@torch.library.custom_op("serial_depth::interpretable", mutates_args=())
@no_type_check
def _interpretable_op(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@_interpretable_op.register_fake
@no_type_check
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def interpretable(x: Shaped[torch.Tensor, "..."]) -> Shaped[torch.Tensor, "..."]:
    """Marks ``x`` as an interpretable state (token ids, a top-k token distribution...).

    The depth of the chain producing ``x`` counts towards the result; everything computed from ``x`` starts a
    new chain at depth 0.
    """
    return _interpretable_op(x)
