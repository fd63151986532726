"""HookedDiffusionGemma: DiffusionGemma's text model with a hook point on every intermediate value.

Read top to bottom: construction and weight tying, the three passes (`encode`, `denoise`,
`forward`), hooks and caching, then thin doors to loading, tokenisation and generation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float, Int

from diffusionlens.cache.selectors import axis_keeping, check_selector, resolve_layer
from diffusionlens.components.attention import Attention
from diffusionlens.components.embed import PlacedByEmbedding
from diffusionlens.components.moe import MoE
from diffusionlens.components.partial_forward import check_layer_order, check_residual, check_return_type
from diffusionlens.components.prompt_state import PromptState
from diffusionlens.components.sampler_hooks import SamplerHooks
from diffusionlens.components.stacks import DecoderStack, EncoderStack
from diffusionlens.config import DiffusionGemmaConfig
from diffusionlens.hooks.name_filters import NameFilter
from diffusionlens.hooks.points import HookedRootModule
from diffusionlens.losses import check_loss_weights, check_targets, denoising_loss
from diffusionlens.sampling.generate import generate as _generate
from diffusionlens.sampling.generate import generate_with_cache as _generate_with_cache
from diffusionlens.sampling.replay import replay_step as _replay_step
from diffusionlens.tokens import TokenHelpers, check_token_ids, checked_attention_mask
from diffusionlens.weights.checkpoint import init_random_weights, load_pretrained
from diffusionlens.weights.checkpoint import save_pretrained as _save_pretrained
from diffusionlens.weights.tl_weights import StackedWeights

if TYPE_CHECKING:
    from diffusionlens.cache.activation import ActivationCache
    from diffusionlens.cache.selectors import Selector
    from diffusionlens.weights.tl_weights import ModelWeights


class HookedDiffusionGemma(TokenHelpers, StackedWeights, PlacedByEmbedding, HookedRootModule):
    """Encoder (causal, writes the prompt's keys/values) + decoder (bidirectional over prompt and
    canvas, self-conditioned on the previous step's logits) + soft-capped tied LM head.

    The two stacks are separate module trees, so every hook name exists once per stack, but they
    share every parameter except each block's `layer_scalar` buffer, as the checkpoint does.
    """

    embedding_stack = "decoder"

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
        init_random_weights(model, seed)
        return model.to(dtype=dtype, device=device)

    # Loading and saving are `diffusionlens.weights.checkpoint`'s functions bound as methods: one explicit,
    # documented signature each (transformers checkpoint directories, in-memory models, hub ids,
    # device_map / max_memory placement; sharded safetensors out).
    from_pretrained = classmethod(load_pretrained)
    save_pretrained = _save_pretrained

    # ------------------------------------------------------------------ passes
    def encode(
        self,
        input_ids: Int[torch.Tensor, "batch pos"] | Float[torch.Tensor, "batch pos d_model"],
        attention_mask: Bool[torch.Tensor, "batch pos"] | Int[torch.Tensor, "batch pos"] | None = None,
        prompt_state: PromptState | None = None,
        *,
        stop_at_layer: int | None = None,
        start_at_layer: int | None = None,
    ) -> PromptState | tuple[Float[torch.Tensor, "batch pos d_model"], PromptState]:
        """Run the encoder over `input_ids`, appending to `prompt_state` if given (a later canvas).

        Partial passes: `stop_at_layer=l` returns `(resid, state)`, the residual before encoder block
        l (its `hook_resid_pre`) and a partial PromptState whose blocks < l already hold these
        tokens' keys/values. `encode(resid, prompt_state=state, start_at_layer=l)` runs the rest
        and returns the finished PromptState, bit-identical to one full `encode`.
        """
        if start_at_layer is not None:
            return self._continue_encode(input_ids, attention_mask, prompt_state, start_at_layer, stop_at_layer)
        stop = resolve_layer(stop_at_layer, self.cfg.num_hidden_layers, what="stop_at_layer", kind="bound")
        if prompt_state is not None and prompt_state.encoded_layers is not None:
            raise ValueError("prompt_state is partial (from stop_at_layer); finish it with start_at_layer first")
        input_ids = self.check_tokens(input_ids, "input_ids")
        if input_ids.shape[1] == 0 and prompt_state is None:
            raise ValueError("input_ids is empty: the encoder needs at least one prompt token (e.g. bos)")
        mask = checked_attention_mask(attention_mask, input_ids, fresh=prompt_state is None)
        start = 0 if prompt_state is None else prompt_state.length
        if start + input_ids.shape[1] + self.cfg.canvas_length > self.cfg.max_position_embeddings:
            raise ValueError(
                f"{start + input_ids.shape[1]} prompt positions plus a canvas of {self.cfg.canvas_length} exceed "
                f"max_position_embeddings={self.cfg.max_position_embeddings}; shorten the prompt"
            )
        self.hook_ctx.step = None
        if stop is None:
            return self.encoder(input_ids, mask, prompt_state)
        return self.encoder(input_ids, mask, prompt_state, stop)

    def _continue_encode(
        self,
        resid: Float[torch.Tensor, "batch pos d_model"],
        attention_mask: torch.Tensor | None,
        prompt_state: PromptState | None,
        start_at_layer: int,
        stop_at_layer: int | None,
    ) -> PromptState | tuple[Float[torch.Tensor, "batch pos d_model"], PromptState]:
        n_layers = self.cfg.num_hidden_layers
        start = resolve_layer(start_at_layer, n_layers, what="start_at_layer", kind="bound")
        stop = resolve_layer(stop_at_layer, n_layers, what="stop_at_layer", kind="bound")
        check_layer_order(start, stop)
        if prompt_state is None or prompt_state.encoded_layers is None:
            raise ValueError(
                "encode(..., start_at_layer=l) continues a partial pass: pass prompt_state=, the state that "
                "encode(..., stop_at_layer=l) returned with the residual"
            )
        if prompt_state.encoded_layers != start:
            raise ValueError(
                f"prompt_state holds blocks < {prompt_state.encoded_layers} but start_at_layer={start_at_layer}; "
                f"use start_at_layer={prompt_state.encoded_layers}"
            )
        if attention_mask is not None:
            raise ValueError("the partial prompt_state already holds the attention mask; pass attention_mask=None")
        expected = (prompt_state.batch_size, prompt_state.pending_positions, self.cfg.hidden_size)
        check_residual(resid, expected, "input_ids")
        self.hook_ctx.step = None
        out_resid, state = self.encoder.run_blocks(resid, prompt_state, stop)
        return state if stop is None else (out_resid, state)

    def denoise(
        self,
        canvas_ids: Int[torch.Tensor, "batch canvas"] | Float[torch.Tensor, "batch canvas d_model"],
        prompt_state: PromptState,
        self_cond_logits: Float[torch.Tensor, "batch canvas vocab"] | None = None,
        *,
        stop_at_layer: int | None = None,
        start_at_layer: int | None = None,
    ) -> Float[torch.Tensor, "batch canvas vocab"] | Float[torch.Tensor, "batch canvas d_model"]:
        """One decoder pass: fp32 soft-capped logits for every canvas position.

        `stop_at_layer=l` returns the residual before decoder block l (its `hook_resid_pre`;
        l = n_layers: after the last block, before the final norm). `start_at_layer=l` takes that
        residual in place of `canvas_ids` and runs blocks >= l, the final norm and the unembedding;
        self-conditioning is already in the residual, so `self_cond_logits` must then be None.
        """
        n_layers = self.cfg.num_hidden_layers
        start = resolve_layer(start_at_layer, n_layers, what="start_at_layer", kind="bound")
        stop = resolve_layer(stop_at_layer, n_layers, what="stop_at_layer", kind="bound")
        check_layer_order(start, stop)
        if not isinstance(prompt_state, PromptState) or prompt_state.encoded_layers is not None:
            raise ValueError(
                "prompt_state must be a finished PromptState from encode(); a partial one (from "
                "encode(..., stop_at_layer=l)) needs encode(resid, prompt_state=state, start_at_layer=l) first"
            )
        if start is not None:
            if self_cond_logits is not None:
                raise ValueError(
                    "self-conditioning enters at the embedding, before any block, so with start_at_layer it is "
                    "already in the residual; pass self_cond_logits=None"
                )
            expected = (prompt_state.batch_size, self.cfg.canvas_length, self.cfg.hidden_size)
            resid = check_residual(canvas_ids, expected, "canvas_ids")
            resid = self.decoder.run_blocks(resid, prompt_state, start, stop)
            return resid if stop is not None else self.decoder.head(resid)
        canvas_ids = self.check_tokens(canvas_ids, "canvas_ids")
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
        if stop is None:
            return self.decoder(canvas_ids, prompt_state, self_cond_logits)
        return self.decoder.run_blocks(self.decoder.embed_canvas(canvas_ids, self_cond_logits), prompt_state, 0, stop)

    def forward(
        self,
        input_ids: Int[torch.Tensor, "batch pos"] | None,
        canvas_ids: Int[torch.Tensor, "batch canvas"] | Float[torch.Tensor, "batch canvas d_model"],
        self_cond_logits: Float[torch.Tensor, "batch canvas vocab"] | None = None,
        attention_mask: Bool[torch.Tensor, "batch pos"] | Int[torch.Tensor, "batch pos"] | None = None,
        *,
        return_type: str | None = "logits",
        targets: Int[torch.Tensor, "batch canvas"] | None = None,
        loss_mask: Bool[torch.Tensor, "batch canvas"] | None = None,
        loss_weights: Float[torch.Tensor, "batch canvas"] | None = None,
        stop_at_layer: int | None = None,
        start_at_layer: int | None = None,
        prompt_state: PromptState | None = None,
    ) -> Any:
        """Encode the prompt, then one decoder pass over the canvas (as transformers' forward).

        return_type: "logits" (default), "loss" (`denoising_loss` of the logits against the clean
        canvas `targets`; pad targets don't count unless `loss_mask` says otherwise, targets equal to
        -100 never count, as in transformers; optional per-position `loss_weights` >= 0), "both"
        (logits, loss), or None. Targets, mask and weights are checked before the pass. `stop_at_layer` /
        `start_at_layer` act on the decoder pass as in `denoise`; pass `prompt_state=` (and
        `input_ids=None`) to reuse an encoded prompt instead of encoding `input_ids`.
        """
        check_return_type(return_type, targets, stop_at_layer)
        if return_type in ("loss", "both"):
            self._check_loss_inputs(canvas_ids, targets, loss_mask, loss_weights)
        if prompt_state is None:
            if input_ids is None:
                raise ValueError("pass input_ids (the prompt) or prompt_state= (an already encoded prompt)")
            prompt_state = self.encode(input_ids, attention_mask)
        elif input_ids is not None or attention_mask is not None:
            raise ValueError("pass either input_ids/attention_mask or prompt_state=, not both")
        out = self.denoise(
            canvas_ids, prompt_state, self_cond_logits, stop_at_layer=stop_at_layer, start_at_layer=start_at_layer
        )
        if stop_at_layer is not None or return_type == "logits":
            return out
        if return_type is None:
            return None
        loss = denoising_loss(out, targets, loss_mask, loss_weights, self.cfg.pad_token_id)
        return loss if return_type == "loss" else (out, loss)

    def _check_loss_inputs(
        self, canvas_ids: torch.Tensor, targets: object, loss_mask: object, loss_weights: object
    ) -> None:
        """Targets, mask and weights of a loss, refused before the pass rather than after it."""
        batch = canvas_ids.shape[0] if isinstance(canvas_ids, torch.Tensor) and canvas_ids.ndim >= 2 else 1
        shape = (batch, self.cfg.canvas_length)
        check_targets(targets, self.cfg.vocab_size, shape)
        for name, value in (("loss_mask", loss_mask), ("loss_weights", loss_weights)):
            if value is not None and (not isinstance(value, torch.Tensor) or tuple(value.shape) != shape):
                raise ValueError(
                    f"{name} has shape {tuple(getattr(value, 'shape', ()))}; expected {shape}, one entry per "
                    "canvas position"
                )
        if loss_weights is not None:
            check_loss_weights(loss_weights)

    def check_tokens(self, ids: Int[torch.Tensor, "batch pos"] | Int[torch.Tensor, " pos"], name: str) -> torch.Tensor:
        """`ids` as a `[batch, pos]` long tensor on the model's device; a 1-D tensor gains a batch axis.

        Raises a TypeError for non-integer input and a ValueError naming `name` for a wrong rank or
        ids outside the vocabulary, so every entry point refuses bad tokens the same way.
        """
        return check_token_ids(ids, name, self.cfg.vocab_size, self.device)

    # ------------------------------------------------------------------ caching
    def run_with_cache(
        self,
        *args: Any,
        names_filter: NameFilter = None,
        device: torch.device | str | None = None,
        fwd_hooks: Iterable[tuple[Any, Callable]] = (),
        incl_bwd: bool = False,
        loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        remove_batch_dim: bool = False,
        pos_slice: Selector = None,
        **kwargs: Any,
    ) -> tuple[Any, ActivationCache]:
        """Run `self(*args, **kwargs)` and return (output, ActivationCache of the matching hooks).

        incl_bwd: as TransformerLens, also call `.backward()` and cache each matching hook's gradient
        as `name + "_grad"`. The output must be a scalar, or pass `loss_fn(output) -> scalar` (e.g.
        `lambda logits: logits[0, 3, token]`). Works on a frozen model: the graph starts at the hook
        points, parameters get no `.grad`.
        remove_batch_dim: as TransformerLens, drop the batch axis of a batch-1 run's values.
        pos_slice: as TransformerLens, keep these canvas positions of every decoder value (an int,
        slice, (start, stop[, step]) tuple, list or tensor; queries for attention patterns). An int
        keeps a size-1 position axis, as TransformerLens. The encoder's values keep their prompt
        positions (another axis), and the output is not sliced.
        """
        from diffusionlens.cache.activation import ActivationCache

        check_selector(pos_slice, "pos_slice")  # refuse before the run, not after it
        if not isinstance(remove_batch_dim, bool):
            raise TypeError(f"remove_batch_dim must be True or False, got {remove_batch_dim!r}")
        if incl_bwd:
            from diffusionlens.cache.gradients import run_with_gradient_cache

            out, cache = run_with_gradient_cache(self, args, kwargs, names_filter, device, fwd_hooks, loss_fn)
        else:
            if loss_fn is not None:
                raise ValueError("loss_fn is only used with incl_bwd=True; pass incl_bwd=True to cache gradients")
            store: dict[str, torch.Tensor] = {}
            hooks = [*fwd_hooks, *self.caching_hooks(store, names_filter, device)]
            out = self.run_with_hooks(*args, fwd_hooks=hooks, **kwargs)
            cache = ActivationCache(store, self)
        cache.apply_pos_slice(axis_keeping(pos_slice)[0], stacks=("decoder",))
        return out, cache.remove_batch_dim() if remove_batch_dim else cache

    # ------------------------------------------------------------------ attribution
    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Fire every `attn.hook_result` (each head's output through o_proj, `[batch, pos, head,
        d_model]`), as TransformerLens's switch of the same name. Off by default: it costs memory."""
        for module in self.modules():
            if isinstance(module, Attention):
                module.use_attn_result = use_attn_result

    def switch_needed(self, name: str) -> str | None:
        """`model.set_use_attn_result(True)` for an `attn.hook_result` that is switched off (likewise
        `set_use_expert_outputs` for `moe.hook_expert_out`): a hook there would never fire, so adding one
        raises, as TransformerLens's `check_hooks_to_add`."""
        for suffix, flag, switch in (
            (".attn.hook_result", "use_attn_result", "model.set_use_attn_result(True)"),
            (".moe.hook_expert_out", "use_expert_outputs", "model.set_use_expert_outputs(True)"),
        ):
            if name.endswith(suffix):
                module = self.get_submodule(name.rpartition(".")[0])  # the attention / MoE module
                return None if getattr(module, flag) else switch
        return None

    def set_use_expert_outputs(self, use_expert_outputs: bool) -> None:
        """Fire every `moe.hook_expert_out` (each chosen expert's weighted output, `[batch, pos, top_k,
        d_model]`). Off by default: it costs memory."""
        for module in self.modules():
            if isinstance(module, MoE):
                module.use_expert_outputs = use_expert_outputs

    def tokens_to_residual_directions(self, tokens: str | int | torch.Tensor) -> Float[torch.Tensor, "... d_model"]:
        """The residual direction whose dot product with the final-normed residual is a token's logit
        (before the soft-cap): a row of the tied embedding, `W_U[:, token]`, for ids of any shape `[...]`; a
        single token (an int, a string of one token, or a one-element tensor) gives one `[d_model]`. (Typed as
        any tensor so that a float tensor gets this check's message.)"""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        ids = torch.as_tensor(tokens, device=self.decoder.embed.W_E.device)
        if ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"tokens must be ids (int or an integer tensor), not {ids.dtype}")
        if ids.numel() == 1:  # one token, whatever its shape: one direction, as TransformerLens
            ids = ids.reshape(())
        return self.decoder.embed.W_E[ids]

    def weights(self, stack: str = "decoder", fold_norm_gains: bool = False) -> ModelWeights:
        """Every weight of `stack` in TransformerLens' shapes: `diffusionlens.weights.tl_weights.model_weights`."""
        from diffusionlens.weights.tl_weights import model_weights

        return model_weights(self, stack, fold_norm_gains=fold_norm_gains)

    # ------------------------------------------------------------------ tokens
    # to_tokens, to_tokens_and_mask, to_str_tokens, to_single_token, get_token_position: TokenHelpers.
    def need_tokenizer(self) -> Any:
        """The tokenizer, or a ValueError saying how to attach one."""
        if self.tokenizer is None:
            raise ValueError(
                "This model has no tokenizer; set model.tokenizer = AutoTokenizer.from_pretrained(...) "
                "or load from a checkpoint directory that contains tokenizer.json"
            )
        return self.tokenizer

    def to_string(self, tokens: torch.Tensor | list[int], skip_special_tokens: bool = False) -> str | list[str]:
        tok = self.need_tokenizer()
        if isinstance(tokens, torch.Tensor) and tokens.ndim == 2:
            return [tok.decode(row.tolist(), skip_special_tokens=skip_special_tokens) for row in tokens]
        ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ generation
    # The sampling functions themselves, bound as methods: one explicit, documented signature (see
    # `diffusionlens.sampling.generate` / `generate_with_cache`), written once.
    generate = _generate
    generate_with_cache = _generate_with_cache

    # The decoder logits of one recorded step recomputed with an autograd graph, bit-identical to what
    # `generate` computed: `diffusionlens.sampling.replay.replay_step`, bound as a method.
    replay_step = _replay_step
