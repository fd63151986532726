"""PromptState: what the encoder leaves for the decoder (per-layer keys and values, padding mask)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float


@dataclass
class PromptState:
    """The encoded prefix of a sequence.

    keys / values: per layer, rotated keys and normalised values `[batch, kv_head, kept, d_head]`.
    Sliding-window layers keep only the last `sliding_window - 1` positions, as the reference's
    cache does: no later query can see further back.
    attention_mask: `[batch, length]`, True for real tokens, over every position encoded so far.
    length: number of positions encoded so far (the next position id).
    last_hidden: the encoder's final-norm output for the tokens of the latest `encode` call.
    encoded_layers: None for a finished state. An int l marks a partial state from
    `encode(..., stop_at_layer=l)`: layers < l hold all `length` positions, layers >= l (if
    present) only the positions before that call; `encode(resid, prompt_state=..., start_at_layer=l)`
    finishes it. pending_positions: in a partial state, how many positions that call adds (the
    residual's length).
    """

    keys: list[Float[torch.Tensor, "batch _kv_head _kept _d_head"]]  # the sizes differ between layers
    values: list[Float[torch.Tensor, "batch _kv_head _kept _d_head"]]
    attention_mask: Bool[torch.Tensor, "batch length"]
    length: int
    last_hidden: Float[torch.Tensor, "batch pos d_model"] | None = field(default=None, repr=False)
    encoded_layers: int | None = None
    pending_positions: int = 0

    @property
    def batch_size(self) -> int:
        return self.attention_mask.shape[0]

    def kept_mask(self, layer: int) -> Bool[torch.Tensor, "batch kept"]:
        """Padding mask of the positions layer `layer` keeps."""
        return self.attention_mask[:, self.attention_mask.shape[1] - self.keys[layer].shape[2] :]

    def to(self, device: torch.device | str) -> PromptState:
        return PromptState(
            [k.to(device) for k in self.keys],
            [v.to(device) for v in self.values],
            self.attention_mask.to(device),
            self.length,
            None if self.last_hidden is None else self.last_hidden.to(device),
            self.encoded_layers,
            self.pending_positions,
        )

    def select(self, rows: torch.Tensor | slice | list[int]) -> PromptState:
        """The state of a subset of the batch."""
        return PromptState(
            [k[rows] for k in self.keys],
            [v[rows] for v in self.values],
            self.attention_mask[rows],
            self.length,
            None if self.last_hidden is None else self.last_hidden[rows],
            self.encoded_layers,
            self.pending_positions,
        )

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))
