"""HookedGemma4CausalLM: transformers' `Gemma4ForCausalLM` (text, MoE) run through diffusionlens's own
causal stack, so an autoregressive twin of a DiffusionGemma model is hooked exactly like it.

The model is one `EncoderStack` (the class DiffusionGemma's prompt encoder uses: same `Block`, same
attention, same MoE, same RoPE) plus the tied, soft-capped LM head. Hook names carry the prefix
`causal.` where the diffusion model has `encoder.` / `decoder.`:

    causal.hook_embed, causal.blocks.{l}.hook_resid_pre … hook_resid_post (every block hook of
    DESIGN.md §2), causal.ln_final.hook_normalized, hook_logits `[batch, pos, vocab]`

During `generate`, `hook.ctx.step` is the index of the token the forward pass is producing (0: the
pass over the prompt, which yields the first new token; k: the pass over new token k-1, which yields
token k); `ctx.canvas` stays 0. `ActivationCache` helpers take `stack="causal"`.

Only Gemma 4 text configs with the DiffusionGemma block are supported: the MoE in parallel with the
dense MLP (`enable_moe_block`), shared keys and values on full layers (`attention_k_eq_v`), no per-layer
embeddings and no key-value sharing across layers. Others are refused with the flag to change.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float, Int
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from diffusionlens.components.embed import PlacedByEmbedding
from diffusionlens.components.prompt_state import PromptState
from diffusionlens.components.stacks import EncoderStack
from diffusionlens.config import DiffusionGemmaConfig, config_dict
from diffusionlens.hooks.name_filters import NameFilter
from diffusionlens.hooks.points import HookedRootModule, HookPoint
from diffusionlens.tokens import check_token_ids, checked_attention_mask
from diffusionlens.weights.checkpoint import (
    CheckpointError,
    assign_checkpoint,
    attach_tokenizer,
    checkpoint_files,
    checkpoint_name,
    init_random_weights,
    iter_safetensors,
    materialize_derived_buffers,
    write_config_files,
)

if TYPE_CHECKING:
    from diffusionlens.cache.activation import ActivationCache

CAUSAL_MODEL_TYPE = "gemma4_text"
CAUSAL_ARCHITECTURE = "Gemma4ForCausalLM"
# Gemma 4 text flags that select the DiffusionGemma block, and the value each must have here.
REQUIRED_FLAGS: dict[str, Any] = {
    "enable_moe_block": True,
    "attention_k_eq_v": True,
    "hidden_size_per_layer_input": 0,
    "num_kv_shared_layers": 0,
}


# ---------------------------------------------------------------------- config
def causal_config_from_hf(source: Any) -> DiffusionGemmaConfig:
    """Our config from a `Gemma4TextConfig`, its `config.json` dict, or a directory / path to one.

    A DiffusionGemma config is refused with a pointer to `HookedDiffusionGemma`.
    """
    text = config_dict(source, "expected a transformers Gemma4TextConfig")
    model_type = text.get("model_type")
    if model_type in ("diffusion_gemma", "diffusion_gemma_text"):
        raise CheckpointError(
            "This is a DiffusionGemma (block-diffusion) checkpoint; load it with "
            "diffusionlens.HookedDiffusionGemma.from_pretrained, not HookedGemma4CausalLM"
        )
    if model_type != CAUSAL_MODEL_TYPE:
        raise CheckpointError(
            f"HookedGemma4CausalLM loads Gemma4ForCausalLM text checkpoints (model_type '{CAUSAL_MODEL_TYPE}'), "
            f"got model_type {model_type!r}"
        )
    wrong = {k: text.get(k) for k, v in REQUIRED_FLAGS.items() if (text.get(k) or 0) != v}
    if wrong:
        raise CheckpointError(
            f"Unsupported Gemma 4 text config {wrong}: HookedGemma4CausalLM runs DiffusionGemma's block, which "
            f"needs {REQUIRED_FLAGS}"
        )
    if text.get("use_bidirectional_attention") is not None:
        raise CheckpointError("use_bidirectional_attention must be None for a causal text model")
    # canvas_length is a diffusion notion; the stack never reads it.
    return DiffusionGemmaConfig._from_text_dict(text, canvas_length=1)


def causal_config_to_hf(cfg: DiffusionGemmaConfig) -> dict[str, Any]:
    """A `config.json` that `AutoConfig` reads as `Gemma4TextConfig` (and `AutoModelForCausalLM` as
    `Gemma4ForCausalLM`)."""
    text = cfg.to_hf_text_dict()
    text.update(REQUIRED_FLAGS)
    text.update(model_type=CAUSAL_MODEL_TYPE, architectures=[CAUSAL_ARCHITECTURE])
    return text


# ---------------------------------------------------------------------- weight names
def hf_name(ours: str) -> str:
    """The `Gemma4ForCausalLM` state-dict name of one of our tensors (`causal.…`).

    Block tensors reuse DiffusionGemma's table (the blocks are the same), re-rooted at `model.layers`.
    """
    rest = ours.removeprefix("causal.")
    if rest == "embed.W_E":
        return "model.embed_tokens.weight"
    if rest == "ln_final.weight":
        return "model.norm.weight"
    if rest.startswith("blocks."):
        return checkpoint_name("decoder." + rest).replace("model.decoder.layers.", "model.layers.", 1)
    raise KeyError(f"{ours} has no Gemma4ForCausalLM name")


@dataclass
class CausalStep:
    """One forward pass: logits for every new position and the key/value state to continue from."""

    logits: Float[torch.Tensor, "batch pos vocab"]
    state: PromptState


class HookedGemma4CausalLM(PlacedByEmbedding, HookedRootModule):
    """A causal Gemma 4 text LM (DiffusionGemma's block) with a hook point on every intermediate value."""

    embedding_stack = "causal"

    def __init__(self, cfg: DiffusionGemmaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.causal = EncoderStack(cfg)
        self.hook_logits = HookPoint()
        self.tokenizer: Any = None
        self.setup()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: DiffusionGemmaConfig | dict | Any, seed: int = 0) -> HookedGemma4CausalLM:
        """A randomly initialised model (normal(0, 0.02) weights, unit norms), reproducible from `seed`.

        Accepts our config (e.g. `diffusionlens.toy.train.toy_config()`) or a Gemma 4 text config."""
        cfg = config if isinstance(config, DiffusionGemmaConfig) else causal_config_from_hf(config)
        model = cls(cfg)
        init_random_weights(model, seed)
        return model

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path | nn.Module,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        progress: bool = True,
    ) -> HookedGemma4CausalLM:
        """Load a `Gemma4ForCausalLM`: a checkpoint directory (safetensors, single or sharded), an
        in-memory transformers model, or "toy-ar" (the shipped twin of the toy)."""
        if isinstance(source, nn.Module):
            cfg = causal_config_from_hf(source.config)
            tensors: Iterable[tuple[str, torch.Tensor]] = source.state_dict().items()
            directory = None
        else:
            directory = _resolve_directory(source)
            cfg = causal_config_from_hf(directory)
            tensors = iter_safetensors(checkpoint_files(directory, CAUSAL_ARCHITECTURE), progress)
        device = torch.device(device) if device is not None else torch.device("cpu")
        with torch.device("meta"):
            model = cls(cfg)
        # lm_head.weight is skipped there: tied to the embedding, as in every Gemma 4 checkpoint
        by_checkpoint_name = {hf_name(n): n for n in model.owned_names()}
        assign_checkpoint(model, tensors, by_checkpoint_name, dtype=dtype, device_for=lambda _: device)
        materialize_derived_buffers(model, device)  # RoPE frequencies, embed scale
        model.setup()
        attach_tokenizer(model, directory)
        return model.eval().requires_grad_(False)

    def owned_names(self) -> list[str]:
        """Our tensors a checkpoint stores: every parameter and every block's layer_scalar."""
        names = [n for n, _ in self.named_parameters()]
        return names + [f"causal.blocks.{i}.layer_scalar" for i in range(self.cfg.num_hidden_layers)]

    def get_parameter_or_buffer(self, name: str) -> torch.Tensor:
        owner, _, attr = name.rpartition(".")
        return getattr(self.get_submodule(owner), attr)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write `config.json`, `generation_config.json` and `model.safetensors` that
        `transformers.AutoModelForCausalLM.from_pretrained` loads as they are (plus the tokenizer)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {hf_name(n): self.get_parameter_or_buffer(n).detach().contiguous().cpu() for n in self.owned_names()}
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        write_config_files(directory, causal_config_to_hf(self.cfg), self.cfg, self.dtype)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(directory))

    # ------------------------------------------------------------------ passes
    def step(
        self,
        input_ids: Int[torch.Tensor, "batch pos"],
        attention_mask: Bool[torch.Tensor, "batch pos"] | Int[torch.Tensor, "batch pos"] | None = None,
        past: PromptState | None = None,
    ) -> CausalStep:
        """Run the stack over `input_ids` (appending to `past` if given); logits for every new position."""
        input_ids = self.check_tokens(input_ids)
        # a causal stack never lets a token see the padding after it: right padding is fine here
        mask = checked_attention_mask(attention_mask, input_ids, fresh=past is None, left_padded=False)
        state = self.causal(input_ids, mask, past)
        return CausalStep(self.head(state.last_hidden), state)

    def head(self, normalized: Float[torch.Tensor, "batch pos d_model"]) -> Float[torch.Tensor, "batch pos vocab"]:
        """Tied LM head on the final-norm output, soft-capped as transformers does (divide, tanh, multiply)."""
        logits = nn.functional.linear(normalized, self.causal.embed.W_E)
        softcap = self.cfg.final_logit_softcapping
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return self.hook_logits(logits)

    def forward(
        self,
        input_ids: Int[torch.Tensor, "batch pos"],
        attention_mask: Bool[torch.Tensor, "batch pos"] | Int[torch.Tensor, "batch pos"] | None = None,
    ) -> Float[torch.Tensor, "batch pos vocab"]:
        """Logits at every position, as `Gemma4ForCausalLM(input_ids, attention_mask).logits`."""
        self.hook_ctx.step = None
        return self.step(input_ids, attention_mask).logits

    def check_tokens(
        self, ids: Int[torch.Tensor, "batch pos"] | Int[torch.Tensor, " pos"], name: str = "input_ids"
    ) -> Int[torch.Tensor, "batch pos"]:
        """As `HookedDiffusionGemma.check_tokens` (`tokens.check_token_ids`), and not empty: every pass of
        the causal stack produces a token from at least one position."""
        ids = check_token_ids(ids, name, self.cfg.vocab_size, self.device)
        if ids.shape[1] == 0:
            raise ValueError(f"{name} is empty: pass at least one token (e.g. bos)")
        return ids

    def run_with_cache(
        self,
        *args: Any,
        names_filter: NameFilter = None,
        device: torch.device | str | None = None,
        fwd_hooks: Iterable[tuple[Any, Callable]] = (),
        **kwargs: Any,
    ) -> tuple[Any, ActivationCache]:
        """Run `self(*args, **kwargs)` and return (logits, ActivationCache of the matching hooks)."""
        from diffusionlens.cache.activation import ActivationCache

        store: dict[str, torch.Tensor] = {}
        out = self.run_with_hooks(
            *args, fwd_hooks=[*fwd_hooks, *self.caching_hooks(store, names_filter, device)], **kwargs
        )
        return out, ActivationCache(store, self)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        input_ids: Int[torch.Tensor, "batch prompt"],
        max_new_tokens: int = 32,
        *,
        eos_token_id: int | Iterable[int] | None = None,
        pad_token_id: int | None = None,
        progress: bool = False,
    ) -> Int[torch.Tensor, "batch total"]:
        """Greedy decoding with a key/value cache: prompt + new tokens, as transformers'
        `generate(do_sample=False)` returns them (finished rows continue with the pad token; the loop
        stops when every row has produced eos). Hooks see `ctx.step` = index of the token produced.

        Prompts must be of equal length (no padding): transformers shifts RoPE positions of left-padded
        rows, this stack does not (as DiffusionGemma's encoder), so padded batches would differ."""
        ids = self.check_tokens(input_ids)
        eos = set(self.cfg.eos_token_ids if eos_token_id is None else _as_ids(eos_token_id))
        pad = self.cfg.pad_token_id if pad_token_id is None else pad_token_id
        eos_tensor = torch.tensor(sorted(eos), device=ids.device, dtype=torch.long)
        unfinished = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
        new_tokens: list[torch.Tensor] = []
        state = None
        try:
            for index in tqdm(range(max_new_tokens), desc="generate", disable=not progress):
                self.hook_ctx.step = index
                out = self.step(ids if state is None else new_tokens[-1][:, None], past=state)
                state = out.state
                token = out.logits[:, -1].argmax(dim=-1)
                if pad is not None:
                    token = torch.where(unfinished, token, torch.full_like(token, pad))
                new_tokens.append(token)
                unfinished &= ~torch.isin(token, eos_tensor)
                if not bool(unfinished.any()):
                    break
        finally:
            self.hook_ctx.reset()
        return torch.cat((ids, torch.stack(new_tokens, dim=1)), dim=1) if new_tokens else ids

    def generate_with_cache(
        self,
        input_ids: Int[torch.Tensor, "batch prompt"],
        max_new_tokens: int = 32,
        names_filter: NameFilter = None,
        **kwargs: Any,
    ) -> tuple[Int[torch.Tensor, "batch total"], list[ActivationCache]]:
        """`generate` plus one `ActivationCache` per forward pass (index = token produced)."""
        from diffusionlens.cache.activation import ActivationCache

        stores: list[dict[str, torch.Tensor]] = []
        keep = self.caching_hooks({}, names_filter)

        def record(tensor: torch.Tensor, hook: HookPoint) -> None:
            while len(stores) <= hook.ctx.step:
                stores.append({})
            stores[hook.ctx.step][hook.name] = tensor.detach()

        with self.hooks_for_run(fwd_hooks=[(name, record) for name, _ in keep]):
            tokens = self.generate(input_ids, max_new_tokens, **kwargs)
        return tokens, [ActivationCache(store, self) for store in stores]

    # ------------------------------------------------------------------ tokens
    def need_tokenizer(self) -> Any:
        """The tokenizer, or a ValueError saying how to attach one (as `HookedDiffusionGemma.need_tokenizer`)."""
        if self.tokenizer is None:
            raise ValueError("This model has no tokenizer; set model.tokenizer or load a directory with tokenizer.json")
        return self.tokenizer

    def to_tokens(self, text: str) -> Int[torch.Tensor, "1 pos"]:
        """Token ids of one prompt, bos included if the tokenizer adds one."""
        return torch.tensor([self.need_tokenizer()(text)["input_ids"]], device=self.device)

    def to_string(self, tokens: torch.Tensor | list[int], skip_special_tokens: bool = False) -> str:
        ids = tokens.reshape(-1).tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        return self.need_tokenizer().decode(ids, skip_special_tokens=skip_special_tokens)


def _as_ids(value: int | Iterable[int]) -> list[int]:
    return [value] if isinstance(value, int) else list(value)


def _resolve_directory(source: str | Path) -> Path:
    from diffusionlens.weights.checkpoint import SHIPPED_CHECKPOINTS

    if isinstance(source, str) and source in SHIPPED_CHECKPOINTS:
        source = SHIPPED_CHECKPOINTS[source]
    path = Path(os.fspath(source))
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (one holding config.json and model.safetensors)")
    return path
