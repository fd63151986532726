"""HookedDiffusionGemma: DiffusionGemma's text model with a hook point on every intermediate value.

Read top to bottom: construction and weight tying, the three passes (`encode`, `denoise`,
`forward`), hooks and caching, then thin doors to loading, tokenisation and generation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float, Int
from torch import nn

from diffusionlens.components.sampler_hooks import SamplerHooks
from diffusionlens.config import DiffusionGemmaConfig
from diffusionlens.hook_points import HookedRootModule, NameFilter
from diffusionlens.prompt_state import PromptState
from diffusionlens.stacks import DecoderStack, EncoderStack

if TYPE_CHECKING:
    from diffusionlens.cache import ActivationCache


class HookedDiffusionGemma(HookedRootModule):
    """Encoder (causal, writes the prompt's keys/values) + decoder (bidirectional over prompt and
    canvas, self-conditioned on the previous step's logits) + soft-capped tied LM head.

    The two stacks are separate module trees, so every hook name exists once per stack, but they
    share every parameter except each block's `layer_scalar` buffer, as the checkpoint does.
    """

    def __init__(self, cfg: DiffusionGemmaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = EncoderStack(cfg)
        self.decoder = DecoderStack(cfg)
        self.sampler = SamplerHooks()
        self.tokenizer: Any = None
        self.tie_weights()
        self.setup()

    def tie_weights(self) -> None:
        """Make the encoder use the decoder's parameters (the decoder owns them in checkpoints)."""
        self.encoder.embed.W_E = self.decoder.embed.W_E
        self.encoder.ln_final.weight = self.decoder.ln_final.weight
        for enc_block, dec_block in zip(self.encoder.blocks, self.decoder.blocks, strict=True):
            for name, param in list(dec_block.named_parameters()):
                owner_path, _, attr = name.rpartition(".")
                owner = enc_block.get_submodule(owner_path) if owner_path else enc_block
                setattr(owner, attr, param)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(
        cls,
        config: DiffusionGemmaConfig | dict | Any,
        seed: int = 0,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> HookedDiffusionGemma:
        """A randomly initialised model (normal(0, 0.02) weights, unit norms), reproducible from `seed`."""
        cfg = config if isinstance(config, DiffusionGemmaConfig) else DiffusionGemmaConfig.from_hf(config)
        model = cls(cfg)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".ln" in name or name.endswith("norm.weight") or "scale" in name:
                    param.fill_(1.0)
                else:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        return model.to(dtype=dtype, device=device)

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path | nn.Module,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        progress: bool = True,
        device_map: str | dict | None = None,
        max_memory: dict | None = None,
    ) -> HookedDiffusionGemma:
        """Load from a transformers checkpoint directory, an in-memory transformers model, or a hub id.

        `device_map="auto"` or `{module: device}` (with optional `max_memory={device: "24GB"}`) spreads
        the blocks over several devices. See `diffusionlens.loading.load_pretrained`.
        """
        from diffusionlens.loading import load_pretrained

        placement = dict(device_map=device_map, max_memory=max_memory)
        return load_pretrained(cls, source, dtype=dtype, device=device, progress=progress, **placement)

    def save_pretrained(self, directory: str | Path, *, max_shard_size: int | str = "5GB") -> None:
        """Write transformers-format safetensors shards and config.json."""
        from diffusionlens.loading import save_pretrained

        save_pretrained(self, directory, max_shard_size=max_shard_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.embed.W_E.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.embed.W_E.device

    # ------------------------------------------------------------------ passes
    def encode(
        self,
        input_ids: Int[torch.Tensor, "batch pos"],
        attention_mask: Bool[torch.Tensor, "batch pos"] | Int[torch.Tensor, "batch pos"] | None = None,
        prompt_state: PromptState | None = None,
    ) -> PromptState:
        """Run the encoder over `input_ids`, appending to `prompt_state` if given (a later canvas)."""
        input_ids = self._check_tokens(input_ids, "input_ids")
        if input_ids.shape[1] == 0 and prompt_state is None:
            raise ValueError("input_ids is empty: the encoder needs at least one prompt token (e.g. bos)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        elif attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                f"{tuple(input_ids.shape)}; pass one mask entry per token"
            )
        start = 0 if prompt_state is None else prompt_state.length
        if start + input_ids.shape[1] + self.cfg.canvas_length > self.cfg.max_position_embeddings:
            raise ValueError(
                f"{start + input_ids.shape[1]} prompt positions plus a canvas of {self.cfg.canvas_length} exceed "
                f"max_position_embeddings={self.cfg.max_position_embeddings}; shorten the prompt"
            )
        self.hook_ctx.step = None
        return self.encoder(input_ids, attention_mask.to(device=input_ids.device, dtype=torch.bool), prompt_state)

    def denoise(
        self,
        canvas_ids: Int[torch.Tensor, "batch canvas"],
        prompt_state: PromptState,
        self_cond_logits: Float[torch.Tensor, "batch canvas vocab"] | None = None,
    ) -> Float[torch.Tensor, "batch canvas vocab"]:
        """One decoder pass: fp32 soft-capped logits for every canvas position."""
        canvas_ids = self._check_tokens(canvas_ids, "canvas_ids")
        batch, length = canvas_ids.shape
        if length != self.cfg.canvas_length:
            raise ValueError(
                f"canvas_ids has length {length} but this model's canvas_length is {self.cfg.canvas_length}; "
                "pass a full canvas (pad it with random or pad tokens)"
            )
        if batch != prompt_state.batch_size:
            raise ValueError(f"canvas batch {batch} != prompt_state batch {prompt_state.batch_size}")
        if self_cond_logits is not None and self_cond_logits.shape != (batch, length, self.cfg.vocab_size):
            raise ValueError(
                f"self_cond_logits has shape {tuple(self_cond_logits.shape)}; expected "
                f"{(batch, length, self.cfg.vocab_size)} (the previous step's logits)"
            )
        return self.decoder(canvas_ids, prompt_state, self_cond_logits)

    def forward(
        self,
        input_ids: Int[torch.Tensor, "batch pos"],
        canvas_ids: Int[torch.Tensor, "batch canvas"],
        self_cond_logits: Float[torch.Tensor, "batch canvas vocab"] | None = None,
        attention_mask: Bool[torch.Tensor, "batch pos"] | None = None,
    ) -> Float[torch.Tensor, "batch canvas vocab"]:
        """Encode the prompt, then one decoder pass over the canvas (as transformers' forward)."""
        return self.denoise(canvas_ids, self.encode(input_ids, attention_mask), self_cond_logits)

    def _check_tokens(self, ids: torch.Tensor, name: str) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32, torch.int16):
            raise TypeError(f"{name} must be an integer tensor of token ids, got {getattr(ids, 'dtype', type(ids))}")
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2:
            raise ValueError(f"{name} must be [batch, pos], got shape {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.cfg.vocab_size):
            raise ValueError(
                f"{name} contains ids outside the vocabulary [0, {self.cfg.vocab_size}): "
                f"min {int(ids.min())}, max {int(ids.max())}; check the tokenizer matches the model"
            )
        return ids.to(device=self.device, dtype=torch.long)

    # ------------------------------------------------------------------ caching
    def run_with_cache(
        self,
        *args: Any,
        names_filter: NameFilter = None,
        device: torch.device | str | None = None,
        fwd_hooks: Iterable[tuple[Any, Callable]] = (),
        **kwargs: Any,
    ) -> tuple[Any, ActivationCache]:
        """Run `self(*args, **kwargs)` and return (output, ActivationCache of the matching hooks)."""
        from diffusionlens.cache import ActivationCache

        store: dict[str, torch.Tensor] = {}
        hooks = [*fwd_hooks, *self.caching_hooks(store, names_filter, device)]
        out = self.run_with_hooks(*args, fwd_hooks=hooks, **kwargs)
        return out, ActivationCache(store, self)

    # ------------------------------------------------------------------ tokens
    def _need_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ValueError(
                "This model has no tokenizer; set model.tokenizer = AutoTokenizer.from_pretrained(...) "
                "or load from a checkpoint directory that contains tokenizer.json"
            )
        return self.tokenizer

    def to_tokens(self, text: str | list[str]) -> Int[torch.Tensor, "batch pos"]:
        """Tokenise (left-padded for a list) exactly as the tokenizer does, bos included if it adds one."""
        return self.to_tokens_and_mask(text)[0]

    def to_tokens_and_mask(
        self, text: str | list[str]
    ) -> tuple[Int[torch.Tensor, "batch pos"], Int[torch.Tensor, "batch pos"]]:
        """`to_tokens` plus the attention mask `generate` needs for a batch of prompts of different
        lengths (1 on prompt tokens, 0 on left padding)."""
        tok = self._need_tokenizer()
        texts = [text] if isinstance(text, str) else list(text)
        rows = [list(tok(t)["input_ids"]) for t in texts]
        width = max(len(r) for r in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        return ids, mask

    def to_string(self, tokens: torch.Tensor | list[int], skip_special_tokens: bool = False) -> str | list[str]:
        tok = self._need_tokenizer()
        if isinstance(tokens, torch.Tensor) and tokens.ndim == 2:
            return [tok.decode(row.tolist(), skip_special_tokens=skip_special_tokens) for row in tokens]
        ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def to_str_tokens(self, tokens: str | torch.Tensor | list[int]) -> list[str]:
        tok = self._need_tokenizer()
        if isinstance(tokens, str):
            tokens = tok(tokens)["input_ids"]
        ids = tokens.reshape(-1).tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        return [tok.decode([i]) for i in ids]

    # ------------------------------------------------------------------ generation
    def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        """Block-diffusion generation with per-step hooks; see `diffusionlens.sampling.generate`."""
        from diffusionlens.sampling.generate import generate

        return generate(self, input_ids, **kwargs)

    def generate_with_cache(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        """`generate` that also records a step-indexed `DenoisingCache`; see `diffusionlens.sampling`."""
        from diffusionlens.sampling.generate import generate_with_cache

        return generate_with_cache(self, input_ids, **kwargs)
