"""Every hook point's name, shape, dtype and firing rule, derived from a config alone.

Used to size caches before a run (`estimate_cache_bytes`, which works on the 26B config without
building the model) and to generate the hook reference in the docs. A test checks that the names
equal a real model's `hook_dict`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffusionlens.components.block import NORMS, SCALED_NORMS
from diffusionlens.components.sampler_hooks import SAMPLER_HOOKS
from diffusionlens.config import DiffusionGemmaConfig

SAE_ACTS_SUFFIX = ".hook_sae_acts_post"
"""An SAE spliced at hook `h` records its feature activations as `h + SAE_ACTS_SUFFIX` (SAELens's name)."""


@dataclass(frozen=True)
class HookSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # "model", "float32", "int64" or "bool"
    fires: str  # "encoder" (once per canvas), "decoder" (every step), "sampler" (every step, in generate)
    pos_axis: int | None  # axis indexed by canvas positions (None: no canvas axis)
    opt_in: str | None = None  # the model switch without which the hook never fires (None: always fires)

    def nbytes(self, model_dtype: torch.dtype) -> int:
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * _itemsize(self.dtype, model_dtype)


def position_axis(name: str) -> int:
    """The axis of a hook's value that indexes token positions (queries, for attention patterns)."""
    return 2 if name.endswith(("hook_attn_scores", "hook_pattern")) else 1


def _itemsize(kind: str, model_dtype: torch.dtype) -> int:
    sizes = {"float32": 4, "int64": 8, "bool": 1}
    return sizes.get(kind) or torch.empty((), dtype=model_dtype).element_size()


def hook_specs(cfg: DiffusionGemmaConfig, batch: int = 1, prompt_len: int = 1) -> dict[str, HookSpec]:
    """Specs of every hook for a first canvas: the encoder over `prompt_len` tokens, the decoder
    over one canvas."""
    specs: dict[str, HookSpec] = {}
    length, d = cfg.canvas_length, cfg.hidden_size

    def add(name: str, shape: tuple[int, ...], fires: str, dtype: str = "model", opt_in: str | None = None) -> None:
        pos_axis = position_axis(name) if fires != "encoder" else None
        specs[name] = HookSpec(name, shape, dtype, fires, pos_axis, opt_in)

    for stack, pos in (("encoder", prompt_len), ("decoder", length)):
        fires = stack
        add(f"{stack}.hook_embed", (batch, pos, d), fires)
        if stack == "decoder":
            add("decoder.self_cond.hook_logits_in", (batch, pos, cfg.vocab_size), fires)
            add("decoder.self_cond.hook_soft_embed", (batch, pos, d), fires)
            add("decoder.self_cond.pre_norm.hook_normalized", (batch, pos, d), fires)
            for part in ("pre", "pre_linear", "post"):
                add(f"decoder.self_cond.mlp.hook_{part}", (batch, pos, cfg.intermediate_size), fires)
            add("decoder.self_cond.hook_out", (batch, pos, d), fires)
            add("decoder.self_cond.post_norm.hook_scale", (batch, pos, 1), fires, "float32")
            add("decoder.self_cond.post_norm.hook_normalized", (batch, pos, d), fires)
        for layer in range(cfg.num_hidden_layers):
            p = f"{stack}.blocks.{layer}"
            heads, kv, hd = cfg.num_attention_heads, cfg.layer_kv_heads(layer), cfg.layer_head_dim(layer)
            if stack == "encoder":
                keys = prompt_len
            else:
                kept = min(prompt_len, cfg.sliding_window - 1) if cfg.is_sliding(layer) else prompt_len
                keys = kept + length
            add(f"{p}.hook_resid_pre", (batch, pos, d), fires)
            for norm in NORMS:
                if norm in SCALED_NORMS:
                    add(f"{p}.{norm}.hook_scale", (batch, pos, 1), fires, "float32")
                add(f"{p}.{norm}.hook_normalized", (batch, pos, d), fires)
            add(f"{p}.attn.hook_q", (batch, pos, heads, hd), fires)
            add(f"{p}.attn.q_norm.hook_normalized", (batch, pos, heads, hd), fires)
            for name in ("hook_k", "hook_v", "k_norm.hook_normalized", "v_norm.hook_normalized", "hook_rot_k"):
                add(f"{p}.attn.{name}", (batch, pos, kv, hd), fires)
            add(f"{p}.attn.hook_rot_q", (batch, pos, heads, hd), fires)
            add(f"{p}.attn.hook_attn_scores", (batch, heads, pos, keys), fires)
            add(f"{p}.attn.hook_pattern", (batch, heads, pos, keys), fires)
            add(f"{p}.attn.hook_z", (batch, pos, heads, hd), fires)
            add(f"{p}.attn.hook_result", (batch, pos, heads, d), fires, opt_in="set_use_attn_result")
            for part in ("pre", "pre_linear", "post"):
                add(f"{p}.mlp.hook_{part}", (batch, pos, cfg.intermediate_size), fires)
            add(f"{p}.moe.hook_router_logits", (batch, pos, cfg.num_experts), fires)
            add(f"{p}.moe.hook_expert_weights", (batch, pos, cfg.top_k_experts), fires, "float32")
            add(f"{p}.moe.hook_expert_indices", (batch, pos, cfg.top_k_experts), fires, "int64")
            # Routed weights are fp32, so the weighted outputs are too (float64 in a float64 model).
            expert_out = (batch, pos, cfg.top_k_experts, d)
            add(f"{p}.moe.hook_expert_out", expert_out, fires, "float32", opt_in="set_use_expert_outputs")
            for name in ("attn_out", "resid_mid", "mlp_out", "moe_out", "ffn_out", "resid_post"):
                add(f"{p}.hook_{name}", (batch, pos, d), fires)
        add(f"{stack}.ln_final.hook_scale", (batch, pos, 1), fires, "float32")
        add(f"{stack}.ln_final.hook_normalized", (batch, pos, d), fires)
    add("decoder.hook_logits", (batch, length, cfg.vocab_size), "decoder", "float32")
    sampler_dtypes = {"logits": "float32", "entropy": "float32", "accepted": "bool"}
    for name in SAMPLER_HOOKS:
        shape = (batch, length, cfg.vocab_size) if name == "logits" else (batch, length)
        add(f"sampler.hook_{name}", shape, "sampler", sampler_dtypes.get(name, "int64"))
    return specs


def estimate_cache_bytes(
    cfg: DiffusionGemmaConfig,
    names: list[str] | None = None,
    *,
    steps: int,
    batch: int = 1,
    prompt_len: int = 1,
    canvases: int = 1,
    positions: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> int:
    """Bytes a DenoisingCache would hold for `names` (default: every hook that fires without an
    opt-in switch) over `steps` steps of `canvases` canvases, keeping `positions` canvas positions
    (default: all). `steps` is the run's step budget (`settings.max_denoising_steps`): a cache's size
    scales with it, so it is never assumed.

    Encoder hooks count once per canvas; decoder and sampler hooks once per step. The prompt grows by
    a canvas per canvas; this estimate uses the first canvas's shapes, a lower bound for encoder hooks.
    """
    specs = hook_specs(cfg, batch, prompt_len)
    chosen = [s for s in specs.values() if s.opt_in is None] if names is None else [specs[n] for n in names]
    total = 0
    for spec in chosen:
        nbytes = spec.nbytes(dtype)
        if positions is not None and spec.pos_axis is not None:
            nbytes = nbytes // spec.shape[spec.pos_axis] * positions
        total += nbytes * (canvases if spec.fires == "encoder" else steps * canvases)
    return total


def hook_reference_markdown(cfg: DiffusionGemmaConfig, batch: int = 1, prompt_len: int = 17) -> str:
    """A markdown table of every hook point of a model with config `cfg` (for the docs)."""
    when = {
        "encoder": "once per canvas (step None)",
        "decoder": "every denoising step",
        "sampler": "every step, in generate only",
    }
    lines = [
        f"Shapes for batch {batch}, a {prompt_len}-token prompt and a {cfg.canvas_length}-token canvas "
        f"(first canvas). `model` dtype is the weights' dtype.",
        "",
        "| hook | shape | dtype | fires |",
        "|---|---|---|---|",
    ]
    for spec in hook_specs(cfg, batch, prompt_len).values():
        fires = when[spec.fires] + (f", only after `model.{spec.opt_in}(True)`" if spec.opt_in else "")
        lines.append(f"| `{spec.name}` | {list(spec.shape)} | {spec.dtype} | {fires} |")
    return "\n".join(lines) + "\n"
