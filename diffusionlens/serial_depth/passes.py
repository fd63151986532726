"""The passes whose depth the report measures, run by the real :class:`HookedDiffusionGemma` on the meta device.

There is no second model here: each pass calls the library's own encoder and decoder stacks
(``diffusionlens/components/``, stacks included), built from a :class:`DiffusionGemmaConfig` on the
meta device (no weight memory, any size), so the traced graph is the computation users run. Two switches on
those modules select the form the depth measurement wants, both documented where they live:

* ``Stack.explicit_masks``: every layer gets a boolean attention mask and no mask value is read on the host
  (meta tensors have none). Attention is then scores + mask, softmax: transformers' eager path, which the
  reference depth rules and the JAX reference charge one mask add per layer.
* ``MoE.gather_experts``: the routed form of the experts. Each token gathers its top-k experts' weight slices
  by index (data movement, depth 0) and applies them with batched matmuls (contraction over ``hidden_size``
  for gate/up, ``moe_intermediate_size`` for down), then a weighted sum over k. That is what routed hardware
  executes; the grouped path's sort and histogram, a loop over all experts, or a dense one-hot mixture would
  charge work no token waits on. The gather's indices come from the router's top-k, so the router's chain is
  in series with the experts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from diffusionlens.components.moe import MoE
from diffusionlens.components.prompt_state import PromptState
from diffusionlens.components.stacks import Stack
from diffusionlens.components.unembed import unembed
from diffusionlens.config import DiffusionGemmaConfig
from diffusionlens.model import HookedDiffusionGemma

__all__ = [
    "DEFAULT_CONFIG",
    "load_config",
    "build_depth_model",
    "ModelPass",
    "EncoderPass",
    "DecoderPass",
    "DiffusionStepPass",
    "CausalLMPass",
]

#: The shipped DiffusionGemma 26B-A4B config (text model only).
DEFAULT_CONFIG = Path(__file__).with_name("diffusiongemma_26b_a4b_text.json")

# Each layer has its own head count, head size and kept length (sliding vs full), so only batch is shared.
PromptCache = list[tuple[Float[Tensor, "batch _kv_head _kept _d_head"], Float[Tensor, "batch _kv_head _kept _d_head"]]]


def load_config(config: str | Path | dict[str, Any] | DiffusionGemmaConfig | None = None) -> DiffusionGemmaConfig:
    """The model config from a ``config.json`` path, an HF config dict (full or bare ``text_config``), a
    :class:`DiffusionGemmaConfig`, or None for the shipped 26B-A4B config."""
    if isinstance(config, DiffusionGemmaConfig):
        return config
    if config is None:
        config = DEFAULT_CONFIG
    if not isinstance(config, dict):
        config = json.loads(Path(config).read_text())
    return DiffusionGemmaConfig.from_hf(config)


def build_depth_model(cfg: DiffusionGemmaConfig, dtype: torch.dtype = torch.float32) -> HookedDiffusionGemma:
    """The real model on the meta device, switched to explicit masks and gathered (routed) experts."""
    with torch.device("meta"):
        model = HookedDiffusionGemma(cfg)
    model = model.to(dtype)
    for module in model.modules():
        if isinstance(module, Stack):
            module.explicit_masks = True
        elif isinstance(module, MoE):
            module.gather_experts = True
    return model


def _all_visible(tokens: Int[Tensor, "batch pos"]) -> torch.Tensor:
    # No padding: a constant mask, so it adds nothing to any chain's depth.
    return torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)


def _prompt_state(cache: PromptCache, prompt_len: int) -> PromptState:
    keys, values = [k for k, _ in cache], [v for _, v in cache]
    mask = torch.ones(keys[0].shape[0], prompt_len, dtype=torch.bool, device=keys[0].device)
    return PromptState(keys, values, mask, prompt_len)


class ModelPass(nn.Module):
    """A traced pass: a module whose forward runs part of `model` (its stacks, as users run them)."""

    def __init__(self, model: HookedDiffusionGemma):
        super().__init__()
        self.model = model


class EncoderPass(ModelPass):
    """Prompt tokens -> each layer's (keys, values) cache, through ``model.encoder``."""

    def forward(self, prompt_ids: Int[Tensor, "batch prompt"]) -> PromptCache:
        state = self.model.encoder(prompt_ids, _all_visible(prompt_ids), None)
        return list(zip(state.keys, state.values, strict=True))


class DecoderPass(ModelPass):
    """Canvas tokens, self-conditioning logits and a prompt cache -> logits, through ``model.decoder``.

    ``prompt_cache`` holds per layer (keys, values) ``[batch, kv_head, kept, d_head]``; the prompt length is
    the longest kept length (full-attention layers keep every prompt position).
    """

    def forward(
        self,
        canvas_ids: Int[Tensor, "batch canvas"],
        sc_logits: Float[Tensor, "batch canvas vocab"],
        prompt_cache: PromptCache,
    ) -> Float[Tensor, "batch canvas vocab"]:
        prompt_len = max(k.shape[2] for k, _ in prompt_cache)
        return self.model.decoder(canvas_ids, _prompt_state(prompt_cache, prompt_len), sc_logits)


class DiffusionStepPass(ModelPass):
    """Encoder over the prompt, then one decoder pass: everything between two token-level states."""

    def forward(
        self,
        prompt_ids: Int[Tensor, "batch prompt"],
        canvas_ids: Int[Tensor, "batch canvas"],
        sc_logits: Float[Tensor, "batch canvas vocab"],
    ) -> Float[Tensor, "batch canvas vocab"]:
        prompt = self.model.encoder(prompt_ids, _all_visible(prompt_ids), None)
        return self.model.decoder(canvas_ids, prompt, sc_logits)


class CausalLMPass(ModelPass):
    """Autoregressive Gemma 4 baseline: the causal encoder stack over tokens, then the tied, soft-capped head.

    Prefill form: every position's path through a cache computed from tokens, which is the longest opaque chain
    an AR token's pass has.
    """

    def forward(self, ids: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos vocab"]:
        state = self.model.encoder(ids, _all_visible(ids), None)
        return unembed(state.last_hidden, self.model.encoder.embed.W_E, self.model.cfg.final_logit_softcapping)
