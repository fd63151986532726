"""ActivationCache: the hook values of one forward pass, with TransformerLens-style helpers."""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float

from diffusionlens.components.unembed import unembed

if TYPE_CHECKING:
    from diffusionlens.model import HookedDiffusionGemma


class ActivationCache:
    """A mapping from hook name to tensor for one forward pass.

    `cache["decoder.blocks.3.hook_resid_post"]` → `[batch, pos, d_model]`. Unknown names raise a
    KeyError that lists the nearest cached names.
    """

    def __init__(self, store: dict[str, torch.Tensor], model: HookedDiffusionGemma | None = None) -> None:
        self._store = store
        self.model = model

    # ------------------------------------------------------------------ mapping
    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self._store[name]
        except KeyError:
            nearest = difflib.get_close_matches(name, list(self._store), n=5, cutoff=0.5)
            hint = f" Nearest cached names: {', '.join(nearest)}." if nearest else ""
            raise KeyError(f"'{name}' is not in this cache.{hint} Record it by widening names_filter.") from None

    def __contains__(self, name: object) -> bool:
        return name in self._store

    def __iter__(self) -> Iterator[str]:
        return iter(self._store)

    def __len__(self) -> int:
        return len(self._store)

    def keys(self):
        return self._store.keys()

    def items(self):
        return self._store.items()

    def values(self):
        return self._store.values()

    def to(self, device: torch.device | str) -> ActivationCache:
        return ActivationCache({k: v.to(device) for k, v in self._store.items()}, self.model)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._store.values())

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} tensors, {self.nbytes() / 2**20:.2f} MiB)"

    # ------------------------------------------------------------------ residual helpers
    def _n_layers(self) -> int:
        if self.model is None:
            raise ValueError("This cache has no model attached; build it with model.run_with_cache")
        return self.model.cfg.num_hidden_layers

    def accumulated_resid(
        self, stack: str = "decoder", layer: int | None = None, apply_ln: bool = False
    ) -> Float[torch.Tensor, "component batch pos d_model"]:
        """Residual stream before each block and after the last: `[layers + 1, batch, pos, d_model]`.

        Needs every `{stack}.blocks.*.hook_resid_pre` and the last `hook_resid_post` (or up to
        `layer`). `apply_ln` applies the final norm, as the logit lens does.
        """
        n = self._n_layers() if layer is None else layer
        parts = [self[f"{stack}.blocks.{i}.hook_resid_pre"] for i in range(min(n, self._n_layers()))]
        if layer is None or layer >= self._n_layers():
            parts.append(self[f"{stack}.blocks.{self._n_layers() - 1}.hook_resid_post"])
        resid = torch.stack(parts)
        if apply_ln:
            resid = self.model.get_submodule(stack).ln_final(resid)
        return resid

    def decompose_resid(
        self, stack: str = "decoder", layer: int | None = None
    ) -> tuple[Float[torch.Tensor, "component batch pos d_model"], list[str]]:
        """The residual at `layer` split into its inputs: embedding path, then each block's attention and
        FFN outputs. DiffusionGemma multiplies each block's output by `layer_scalar`, so earlier terms are
        rescaled by the product of later scalars; the components sum to the residual exactly."""
        n = self._n_layers() if layer is None else layer
        scalars = [float(self.model.get_submodule(f"{stack}.blocks.{i}").layer_scalar) for i in range(n)]

        def later(i: int) -> float:
            out = 1.0
            for s in scalars[i:]:
                out *= s
            return out

        parts, labels = [self[f"{stack}.blocks.0.hook_resid_pre"] * later(0)], ["embed"]
        for i in range(n):
            parts.append(self[f"{stack}.blocks.{i}.hook_attn_out"] * later(i))
            labels.append(f"{i}_attn_out")
            parts.append(self[f"{stack}.blocks.{i}.hook_ffn_out"] * later(i))
            labels.append(f"{i}_ffn_out")
        return torch.stack(parts), labels

    def logit_lens(
        self, stack: str = "decoder", layer: int | None = None
    ) -> Float[torch.Tensor, "component batch pos vocab"]:
        """Logits read off the residual before every block (and after the last) through the final norm
        and the soft-capped tied head: `[layers + 1, batch, pos, vocab]`."""
        resid = self.accumulated_resid(stack, layer, apply_ln=True)
        W_E = self.model.get_submodule(stack).embed.W_E
        return unembed(resid, W_E, self.model.cfg.final_logit_softcapping)
