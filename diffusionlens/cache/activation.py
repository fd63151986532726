"""ActivationCache: the hook values of one forward pass, with TransformerLens-style helpers."""

from __future__ import annotations

import difflib
import warnings
from collections.abc import ItemsView, Iterator, KeysView, ValuesView
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float

from diffusionlens.cache.decomposition import ResidDecompositionMixin
from diffusionlens.cache.selectors import Selector, axis_keeping, check_selector, check_stack, index_axis, resolve_layer
from diffusionlens.hooks.names import resolve_act_key
from diffusionlens.hooks.shapes import position_axis

if TYPE_CHECKING:
    from diffusionlens.model import HookedDiffusionGemma


class ActivationCache(ResidDecompositionMixin):
    """A mapping from hook name to tensor for one forward pass.

    `cache["decoder.blocks.3.hook_resid_post"]` → `[batch, pos, d_model]`. Unknown names raise a
    KeyError that lists the nearest cached names.
    """

    def __init__(
        self, store: dict[str, torch.Tensor], model: HookedDiffusionGemma | None = None, has_batch_dim: bool = True
    ) -> None:
        self._store = store
        self.model = model
        self.has_batch_dim = has_batch_dim

    @property
    def cache_dict(self) -> dict[str, torch.Tensor]:
        """The underlying dict from hook name to value (TransformerLens's attribute): the cache's own
        storage, not a copy."""
        return self._store

    # ------------------------------------------------------------------ mapping
    def _resolve(self, key: str | tuple) -> str:
        """A key as a stored name: a full hook name, a TransformerLens short name ("resid_post" needs
        no layer only for stack-level hooks: "embed", "logits") or a tuple (name, layer[, layer_type][, stack])."""
        return resolve_act_key(key, self.model, self._store)

    def __getitem__(self, key: str | tuple) -> torch.Tensor:
        name = self._resolve(key)
        try:
            return self._store[name]
        except KeyError:
            nearest = difflib.get_close_matches(name, list(self._store), n=5, cutoff=0.5)
            hint = f" Nearest cached names: {', '.join(nearest)}." if nearest else ""
            raise KeyError(f"'{name}' is not in this cache.{hint} Record it by widening names_filter.") from None

    def get(self, key: str | tuple, default: torch.Tensor | None = None) -> torch.Tensor | None:
        """`cache[key]`, or `default` when it was not cached (as dict.get)."""
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: object) -> bool:
        try:
            return self._resolve(key) in self._store  # type: ignore[arg-type]
        except (KeyError, ValueError, TypeError):
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self._store)

    def __len__(self) -> int:
        return len(self._store)

    def keys(self) -> KeysView[str]:
        return self._store.keys()

    def items(self) -> ItemsView[str, torch.Tensor]:
        return self._store.items()

    def values(self) -> ValuesView[torch.Tensor]:
        return self._store.values()

    def to(self, device: torch.device | str) -> ActivationCache:
        """Move every value to `device` in place and return the cache (as TransformerLens)."""
        self._store = {k: v.to(device) for k, v in self._store.items()}
        return self

    def remove_batch_dim(self) -> ActivationCache:
        """Drop the leading batch axis of every value of a batch-1 cache, in place, and return the cache
        (as TransformerLens). Positional helpers (accumulated_resid, …) keep working."""
        if not self.has_batch_dim:
            warnings.warn("remove_batch_dim: the batch axis was already removed; nothing to do", stacklevel=2)
            return self
        sizes = {v.shape[0] if v.ndim else None for v in self._store.values()}
        if sizes - {1}:
            raise ValueError(
                f"remove_batch_dim needs batch size 1, but values have leading sizes {sorted(sizes - {1}, key=str)}; "
                "run a single prompt or index one row (cache[name][i])"
            )
        self._store = {k: v[0] for k, v in self._store.items()}
        self.has_batch_dim = False
        return self

    def apply_slice_to_batch_dim(self, batch_slice: Selector) -> ActivationCache:
        """A new cache with every value's batch axis indexed by `batch_slice` (as TransformerLens: an int
        removes the axis, so the new cache has no batch axis)."""
        check_selector(batch_slice, "batch_slice")
        if batch_slice is None:
            return ActivationCache(dict(self._store), self.model, self.has_batch_dim)
        if not self.has_batch_dim:
            raise ValueError("this cache has no batch axis (remove_batch_dim was applied): there is nothing to slice")
        sliced = {k: index_axis(v, batch_slice, 0, "batch_slice", f"{k} batch rows") for k, v in self._store.items()}
        return ActivationCache(sliced, self.model, has_batch_dim=not axis_keeping(batch_slice)[1])

    def toggle_autodiff(self, mode: bool = False) -> None:
        """Switch torch's autograd on or off for the whole process (`torch.set_grad_enabled(mode)`), as
        TransformerLens's method of the same name; prefer `with torch.no_grad():` for a scoped switch."""
        if not isinstance(mode, bool):
            raise TypeError(f"mode must be True or False, got {mode!r}")
        warnings.warn(f"toggle_autodiff: autograd is now {'on' if mode else 'off'} for the whole process", stacklevel=2)
        torch.set_grad_enabled(mode)

    def stack_activation(
        self, activation_name: str, layer: int = -1, sublayer_type: str | None = None, *, stack: str = "decoder"
    ) -> Float[torch.Tensor, "layer *value"]:
        """`cache[activation_name, l]` for every block l before `layer` (-1: every block), stacked on a new
        leading axis, as TransformerLens: `stack_activation("pattern")` → `[layer, batch, head, q, k]`.
        Layers whose shapes differ (local and global head sizes) cannot stack: index them one by one."""
        n = self._model().cfg.num_hidden_layers
        upto = n if layer == -1 else resolve_layer(layer, n, kind="residual")
        keys = [(activation_name, i, *((sublayer_type,) if sublayer_type else ()), stack) for i in range(upto)]
        values = [self[key] for key in keys]
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) > 1:
            raise ValueError(
                f"stack_activation({activation_name!r}): the layers' values have different shapes {sorted(shapes)} "
                "(local and global attention differ in head size); read cache[name, layer] per layer"
            )
        return torch.stack(values)

    def get_neuron_results(
        self, layer: int, neuron_slice: Selector = None, pos_slice: Selector = None, *, stack: str = "decoder"
    ) -> Float[torch.Tensor, "batch *pos neuron d_model"]:
        """Each dense-MLP neuron's output at block `layer`, `mlp.hook_post[..., n] · W_out[n]`
        (`[batch, pos, neuron, d_model]`), before the MLP's post-norms, as TransformerLens's method (which
        stops before any norm too); `stack_neuron_results` carries them on to the residual. Positions are
        sliced first (an int drops the axis), then neurons."""
        layer = resolve_layer(layer, self._model().cfg.num_hidden_layers, kind="block")
        post = self[f"{check_stack(stack, self.model)}.blocks.{layer}.mlp.hook_post"]
        W_out = self._model().get_submodule(f"{stack}.blocks.{layer}.mlp").down_proj.weight.detach().T
        post = index_axis(post, pos_slice, -2, "pos_slice", "positions")
        post = index_axis(post, neuron_slice, -1, "neuron_slice", "neurons")
        W_out = index_axis(W_out, neuron_slice, 0, "neuron_slice", "neurons")
        return post[..., None] * W_out.to(post.device, post.dtype)

    def apply_pos_slice(self, pos_slice: Selector, stacks: tuple[str, ...] | None = None) -> ActivationCache:
        """Index every value's position axis (queries, for attention patterns) by `pos_slice`, in place
        (an int drops the axis); `stacks` limits it to the values of those stacks (None: every value)."""
        check_selector(pos_slice, "pos_slice")
        if pos_slice is not None:
            offset = 0 if self.has_batch_dim else -1
            self._store = {
                k: v
                if stacks is not None and k.partition(".")[0] not in stacks
                else index_axis(
                    v, pos_slice, position_axis(k.removesuffix("_grad")) + offset, "pos_slice", f"{k} positions"
                )
                for k, v in self._store.items()
            }
        return self

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._store.values())

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} tensors, {self.nbytes() / 2**20:.2f} MiB)"
