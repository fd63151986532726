"""Gradients of one forward pass without ceremony: `run_with_cache(incl_bwd=True)`.

A loaded model is frozen (parameters have requires_grad=False), so a forward pass leaves no graph to
differentiate. This one builds it from the activations instead: hook points with backward hooks start
the graph at their value (see `HookPoint._run_hooks`). Parameter gradients stay off unless the caller
turned them on. `diffusionlens.sampling.replay.replay_step` does the same for a recorded denoising step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from diffusionlens.cache.activation import ActivationCache
    from diffusionlens.hooks.name_filters import NameFilter
    from diffusionlens.model import HookedDiffusionGemma


def run_with_gradient_cache(
    model: HookedDiffusionGemma,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    names_filter: NameFilter,
    device: torch.device | str | None,
    fwd_hooks: Iterable[tuple[Any, Callable]],
    loss_fn: Callable[[torch.Tensor], torch.Tensor] | None,
) -> tuple[Any, ActivationCache]:
    """`run_with_cache(..., incl_bwd=True)`: forward, `.backward()` on the (scalar) output or on
    `loss_fn(output)`, and a cache holding each matching value and its gradient as `name + "_grad"`."""
    from diffusionlens.cache.activation import ActivationCache

    refuse_inference_mode("run_with_cache(incl_bwd=True)")
    store: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}
    forward = [*fwd_hooks, *model.caching_hooks(store, names_filter, device)]
    backward = model.caching_hooks(grads, names_filter, device)
    # The caller asked for gradients, so a surrounding no_grad (common in analysis code) is overridden.
    with torch.enable_grad():
        out = model.run_with_hooks(*args, fwd_hooks=forward, bwd_hooks=backward, **kwargs)
        _scalar_to_differentiate(out, loss_fn).backward()
    store.update({f"{name}_grad": grad for name, grad in grads.items()})
    return out, ActivationCache(store, model)


def _scalar_to_differentiate(out: Any, loss_fn: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    if loss_fn is None:
        if isinstance(out, torch.Tensor) and out.numel() == 1:
            return out.reshape(())
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"incl_bwd=True calls .backward() on the output, which is {shape}, not a scalar; pass "
            "loss_fn=lambda logits: logits[0, pos, token] (or any function returning a scalar)"
        )
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a function output -> scalar tensor, got {type(loss_fn).__name__}")
    value = loss_fn(out)
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"loss_fn must return a scalar tensor, got {shape}; reduce it, e.g. with .sum()")
    if not value.requires_grad:
        raise ValueError(
            "loss_fn's result does not depend on any cached hook value, so there is nothing to differentiate; "
            "widen names_filter to hook points upstream of the loss"
        )
    return value.reshape(())


def refuse_inference_mode(what: str) -> None:
    """Refuse to run `what` under `torch.inference_mode()`, which no gradient can get through."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{what} needs autograd, which torch.inference_mode() disables for good; call it outside "
            "inference_mode (torch.no_grad() is fine: it is overridden)"
        )
