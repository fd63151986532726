"""The encoder stack (causal over the prompt, writes keys/values) and the decoder stack
(bidirectional over the cached prompt plus the canvas, reads them)."""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import nn

from diffusionlens.components import Block, Embed, RMSNorm, RotaryEmbedding, SelfConditioning
from diffusionlens.components.prompt_state import PromptState
from diffusionlens.components.unembed import unembed
from diffusionlens.config import FULL, SLIDING, DiffusionGemmaConfig
from diffusionlens.hooks.points import HookPoint


class Stack(nn.Module):
    """Shared parts of the encoder and decoder stacks.

    `explicit_masks` (default False): when True, every layer receives a boolean attention mask, even
    where nothing is masked, and the stack never reads mask values on the host. Off, a batch without
    padding takes SDPA's mask-free kernels (bit-identical to transformers' sdpa path), which needs a
    `bool(mask.all())` check; on, the stack runs on tensors without values (the meta device, where
    `serial_depth` traces it) and computes attention the way transformers' eager path does (scores +
    mask, softmax), the same numbers up to kernel rounding.
    """

    explicit_masks: bool = False

    def __init__(self, cfg: DiffusionGemmaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = Embed(cfg)
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.num_hidden_layers))
        self.ln_final = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, scale_hook=True)  # feeds the unembedding
        self.rotary = RotaryEmbedding(cfg)
        self.hook_embed = HookPoint()

    def rotary_tables(self, positions: torch.Tensor, dtype: torch.dtype) -> dict[str, tuple]:
        return {kind: self.rotary(positions, kind, dtype) for kind in (SLIDING, FULL)}


class EncoderStack(Stack):
    """Causal Gemma 4 text stack over the prompt; sliding layers see the last `sliding_window` tokens."""

    def forward(
        self,
        tokens: Int[torch.Tensor, "batch pos"],
        attention_mask: Bool[torch.Tensor, "batch pos"],
        past: PromptState | None,
        stop: int | None = None,
    ) -> PromptState | tuple[Float[torch.Tensor, "batch pos d_model"], PromptState]:
        """The finished PromptState; with `stop`, `(resid before block stop, partial state)`."""
        full_mask = attention_mask if past is None else torch.cat((past.attention_mask, attention_mask), dim=1)
        # A state in which no layer has seen the new tokens yet; run_blocks fills it in.
        length = (0 if past is None else past.length) + tokens.shape[1]
        keys, values = ([], []) if past is None else (list(past.keys), list(past.values))
        state = PromptState(keys, values, full_mask, length, encoded_layers=0, pending_positions=tokens.shape[1])
        resid, state = self.run_blocks(self.hook_embed(self.embed(tokens)), state, stop)
        return state if stop is None else (resid, state)

    def run_blocks(
        self, resid: Float[torch.Tensor, "batch pos d_model"], state: PromptState, stop: int | None = None
    ) -> tuple[Float[torch.Tensor, "batch pos d_model"], PromptState]:
        """Run blocks `state.encoded_layers` .. `stop` over the newest `resid.shape[1]` positions.

        `state` is partial: layers below `encoded_layers` already hold every position, the others
        only those before this call (their past). Returns `(resid before block stop, partial
        state)`, or after the last block `(its output, the finished PromptState)`. Positions and
        masks are rebuilt from the state, so a continuation computes exactly what one full pass does.
        """
        cfg = self.cfg
        first = state.encoded_layers or 0
        stop = cfg.num_hidden_layers if stop is None else stop
        full_mask = state.attention_mask
        n_new = resid.shape[1]
        start = state.length - n_new
        q_pos = torch.arange(start, start + n_new, device=resid.device)
        tables = self.rotary_tables(q_pos[None], resid.dtype)
        window_keep = cfg.sliding_window - 1
        no_padding = not self.explicit_masks and bool(full_mask.all())
        masks: dict[tuple[bool, int], torch.Tensor | None] = {}
        keys_out, values_out = list(state.keys), list(state.values)
        for layer in range(first, stop):
            block = self.blocks[layer]
            # Layers not yet run this call hold their past (if any) at index `layer`.
            past_k = keys_out[layer] if layer < len(keys_out) else None
            past_v = values_out[layer] if layer < len(values_out) else None
            n_past = 0 if past_k is None else past_k.shape[2]
            key = (block.sliding, n_past)
            if key not in masks:
                masks[key] = self._mask(start, n_new, n_past, full_mask, block.sliding, no_padding)
            cos, sin = tables[cfg.layer_types[layer]]
            resid, new_k, new_v = block(resid, cos, sin, past_k, past_v, masks[key], causal=True)
            k = new_k if past_k is None else torch.cat((past_k, new_k), dim=2)
            v = new_v if past_v is None else torch.cat((past_v, new_v), dim=2)
            if block.sliding:
                k, v = k[:, :, -window_keep:], v[:, :, -window_keep:]
            if layer < len(keys_out):
                keys_out[layer], values_out[layer] = k, v
            else:
                keys_out.append(k)
                values_out.append(v)
        if stop < cfg.num_hidden_layers:
            partial = PromptState(keys_out, values_out, full_mask, state.length, None, stop, n_new)
            return resid, partial
        return resid, PromptState(keys_out, values_out, full_mask, state.length, self.ln_final(resid))

    def _mask(
        self, start: int, n_new: int, n_past: int, full_mask: torch.Tensor, sliding: bool, no_padding: bool
    ) -> Bool[torch.Tensor, "batch 1 q k"] | None:
        """Boolean mask over [kept past keys ; new keys], or None where SDPA's `is_causal` says it all.

        The None cases are exactly those in which transformers skips building a mask (a fresh
        prompt without padding that fits the window), so both run the same attention kernel.
        """
        if n_past == 0 and no_padding and (not sliding or n_new < self.cfg.sliding_window):
            return None
        device = full_mask.device
        q_pos = torch.arange(start, start + n_new, device=device)
        k_pos = torch.arange(start - n_past, start + n_new, device=device)
        allowed = k_pos[None, :] <= q_pos[:, None]
        if sliding:
            allowed = allowed & (k_pos[None, :] > q_pos[:, None] - self.cfg.sliding_window)
        return allowed[None, None] & full_mask[:, None, None, k_pos]


class DecoderStack(Stack):
    """Bidirectional stack over [cached prompt ; canvas], with self-conditioning and the LM head."""

    def __init__(self, cfg: DiffusionGemmaConfig) -> None:
        super().__init__(cfg)
        self.self_cond = SelfConditioning(cfg)
        self.hook_logits = HookPoint()

    def forward(
        self,
        canvas: Int[torch.Tensor, "batch canvas"],
        prompt: PromptState,
        self_cond_logits: Float[torch.Tensor, "batch canvas vocab"] | None,
    ) -> Float[torch.Tensor, "batch canvas vocab"]:
        return self.head(self.run_blocks(self.embed_canvas(canvas, self_cond_logits), prompt))

    def embed_canvas(
        self,
        canvas: Int[torch.Tensor, "batch canvas"],
        self_cond_logits: Float[torch.Tensor, "batch canvas vocab"] | None,
    ) -> Float[torch.Tensor, "batch canvas d_model"]:
        """Token embedding plus self-conditioning: the input of block 0."""
        token_embed = self.hook_embed(self.embed(canvas))
        return self.self_cond(token_embed, self_cond_logits, self.embed)

    def run_blocks(
        self,
        resid: Float[torch.Tensor, "batch canvas d_model"],
        prompt: PromptState,
        start: int = 0,
        stop: int | None = None,
    ) -> Float[torch.Tensor, "batch canvas d_model"]:
        """Blocks `start` .. `stop` (exclusive); positions and masks are rebuilt from `prompt`, so
        running [0, l) then [l, n) computes exactly what one full pass does."""
        cfg = self.cfg
        batch, length = resid.shape[:2]
        stop = cfg.num_hidden_layers if stop is None else stop
        positions = torch.arange(prompt.length, prompt.length + length, device=resid.device)
        tables = self.rotary_tables(positions[None], resid.dtype)
        # Everything is visible except padding in the prompt; without padding no mask is needed.
        masks: dict[int, torch.Tensor | None] = {}
        build_masks = self.explicit_masks or not bool(prompt.attention_mask.all())
        canvas_visible = torch.ones(batch, length, dtype=torch.bool, device=resid.device) if build_masks else None
        for layer in range(start, stop):
            block = self.blocks[layer]
            n_kept = prompt.keys[layer].shape[2]
            if n_kept not in masks:
                masks[n_kept] = None
                if build_masks:
                    visible = torch.cat((prompt.kept_mask(layer), canvas_visible), dim=1)
                    masks[n_kept] = visible[:, None, None, :].expand(batch, 1, length, -1)
            cos, sin = tables[cfg.layer_types[layer]]
            resid, _, _ = block(resid, cos, sin, prompt.keys[layer], prompt.values[layer], masks[n_kept], causal=False)
        return resid

    def head(self, resid: Float[torch.Tensor, "batch canvas d_model"]) -> Float[torch.Tensor, "batch canvas vocab"]:
        """Final norm and the soft-capped tied unembedding (fp32 logits)."""
        resid = self.ln_final(resid)
        return self.hook_logits(unembed(resid, self.embed.W_E, self.cfg.final_logit_softcapping))
