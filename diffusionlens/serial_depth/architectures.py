"""A minimal functional reference of the DiffusionGemma / Gemma 4 text stack, for depth measurement only.

It mirrors the op sequence of ``transformers``' ``DiffusionGemma{Encoder,Decoder}TextLayer`` (RMSNorms with
``x * (mean(x^2) + eps)^-0.5``, q/k/v norms, RoPE, GQA attention with ``scaling = 1``, k=v on full-attention
layers, a dense gated-GELU MLP in parallel with a top-k MoE, ``layer_scalar``, final norm, tied LM head, tanh
soft-cap) but is built on the meta device: it never holds weights and cannot produce numbers, only graphs.

The MoE is written in its *routed* form: each token gathers its top-k experts' weight slices by index (data
movement, depth 0) and applies them with one batched matmul (contraction over ``hidden_size`` for gate/up and
``moe_intermediate_size`` for down), then a weighted sum over k. The depth of that graph is what routed
hardware executes; a loop over all experts, or a dense one-hot mixture, would charge work no token does.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

__all__ = [
    "TextSpec",
    "load_config",
    "GemmaTextStack",
    "EncoderPass",
    "DecoderPass",
    "DiffusionStepPass",
    "CausalLMPass",
    "build_stack",
]

DEFAULT_CONFIG = Path(__file__).with_name("diffusiongemma_26b_a4b_text.json")


@dataclass(frozen=True)
class TextSpec:
    """The fields of an HF ``text_config`` that shape the computation."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    layer_types: tuple[str, ...]
    per_layer: dict[int, dict[str, int]]
    intermediate_size: int
    num_experts: int
    top_k_experts: int
    moe_intermediate_size: int
    vocab_size: int
    sliding_window: int
    rms_norm_eps: float
    final_logit_softcapping: float | None
    rope_parameters: dict[str, dict[str, Any]]

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> TextSpec:
        """Builds a spec from an HF text config dict (or a full config with ``text_config``)."""
        cfg = cfg.get("text_config", cfg)
        n = cfg["num_hidden_layers"]
        types = cfg.get("layer_types") or [
            "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)
        ]
        per_layer = {int(k): dict(v) for k, v in (cfg.get("per_layer_config") or {}).items()}
        return cls(
            hidden_size=cfg["hidden_size"],
            num_hidden_layers=n,
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg["num_key_value_heads"],
            head_dim=cfg["head_dim"],
            layer_types=tuple(types),
            per_layer=per_layer,
            intermediate_size=cfg["intermediate_size"],
            num_experts=cfg.get("num_experts") or 0,
            top_k_experts=cfg.get("top_k_experts") or 0,
            moe_intermediate_size=cfg.get("moe_intermediate_size") or 0,
            vocab_size=cfg["vocab_size"],
            sliding_window=cfg["sliding_window"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            final_logit_softcapping=cfg.get("final_logit_softcapping"),
            rope_parameters=cfg.get("rope_parameters") or {},
        )

    def layer_attn(self, i: int) -> tuple[int, int]:
        """(head_dim, num_key_value_heads) of layer ``i``."""
        over = self.per_layer.get(i, {})
        return over.get("head_dim", self.head_dim), over.get("num_key_value_heads", self.num_key_value_heads)


def load_config(config: str | Path | dict[str, Any] | None = None) -> tuple[TextSpec, int]:
    """Loads (text spec, canvas_length) from a path, a dict, or the shipped 26B-A4B config."""
    if config is None:
        config = DEFAULT_CONFIG
    if not isinstance(config, dict):
        config = json.loads(Path(config).read_text())
    return TextSpec.from_dict(config), int(config.get("canvas_length", 256))


class RMSNorm(nn.Module):
    """Gemma RMSNorm, with the fp32 upcast of the HF implementation."""

    def __init__(self, dim: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        h = x.float()
        h = h * torch.pow(h.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            h = h * self.weight.float()
        return h.to(x.dtype)


def rope_cos_sin(
    positions: Int[Tensor, " s"], head_dim: int, params: dict[str, Any], dtype: torch.dtype
) -> tuple[Float[Tensor, "s d"], Float[Tensor, "s d"]]:
    """RoPE tables; partial rotary factors leave the tail frequencies at 0 (cos 1, sin 0)."""
    theta = float(params.get("rope_theta", 10000.0))
    rot = int(head_dim * float(params.get("partial_rotary_factor", 1.0))) // 2 * 2
    inv = 1.0 / theta ** (torch.arange(0, rot, 2, dtype=torch.float32, device=positions.device) / head_dim)
    inv = torch.cat([inv, inv.new_zeros(head_dim // 2 - rot // 2)])
    freqs = positions.float()[:, None] * inv[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Float[Tensor, "b s h d"], cos: Float[Tensor, "s d"], sin: Float[Tensor, "s d"]) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class Attention(nn.Module):
    """Gemma 4 attention: q/k/v RMSNorms, RoPE, GQA, k=v on full layers, optional read-only prefix KV."""

    def __init__(self, spec: TextSpec, i: int):
        super().__init__()
        self.spec, self.sliding = spec, spec.layer_types[i] == "sliding_attention"
        self.head_dim, self.kv_heads = spec.layer_attn(i)
        self.heads, d = spec.num_attention_heads, spec.hidden_size
        self.q_proj = nn.Linear(d, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=False) if self.sliding else None
        self.o_proj = nn.Linear(self.heads * self.head_dim, d, bias=False)
        self.q_norm = RMSNorm(self.head_dim, spec.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, spec.rms_norm_eps)
        self.v_norm = RMSNorm(self.head_dim, spec.rms_norm_eps, with_scale=False)

    def forward(
        self,
        x: Float[Tensor, "b s d"],
        positions: Int[Tensor, " s"],
        mask: Float[Tensor, "s t"],
        past: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Float[Tensor, "b s d"], tuple[Tensor, Tensor]]:
        b, s, _ = x.shape
        kind = "sliding_attention" if self.sliding else "full_attention"
        cos, sin = rope_cos_sin(positions, self.head_dim, self.spec.rope_parameters.get(kind, {}), x.dtype)
        q = apply_rope(self.q_norm(self.q_proj(x).view(b, s, -1, self.head_dim)), cos, sin).transpose(1, 2)
        k_raw = self.k_proj(x).view(b, s, -1, self.head_dim)
        v = self.v_proj(x).view(b, s, -1, self.head_dim) if self.v_proj is not None else k_raw
        k = apply_rope(self.k_norm(k_raw), cos, sin).transpose(1, 2)
        v = self.v_norm(v).transpose(1, 2)
        new_kv = (k, v)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        rep = self.heads // self.kv_heads
        k = k[:, :, None].expand(-1, -1, rep, -1, -1).reshape(b, self.heads, -1, self.head_dim)
        v = v[:, :, None].expand(-1, -1, rep, -1, -1).reshape(b, self.heads, -1, self.head_dim)
        scores = torch.matmul(q, k.transpose(2, 3)) * 1.0  # HF multiplies by scaling (= 1.0) explicitly
        probs = torch.softmax(scores + mask, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, s, -1)
        return self.o_proj(out), new_kv


class GatedMLP(nn.Module):
    def __init__(self, d: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, inner, bias=False)
        self.up_proj = nn.Linear(d, inner, bias=False)
        self.down_proj = nn.Linear(inner, d, bias=False)

    def forward(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        gate = nn.functional.gelu(self.gate_proj(x), approximate="tanh")
        return self.down_proj(gate * self.up_proj(x))


class Router(nn.Module):
    """Gemma 4 router: unscaled RMSNorm, learned scale, projection, softmax, top-k, renormalise, expert scale."""

    def __init__(self, spec: TextSpec):
        super().__init__()
        d, e = spec.hidden_size, spec.num_experts
        self.k, self.root = spec.top_k_experts, d**-0.5
        self.norm = RMSNorm(d, spec.rms_norm_eps, with_scale=False)
        self.proj = nn.Linear(d, e, bias=False)
        self.scale = nn.Parameter(torch.ones(d))
        self.per_expert_scale = nn.Parameter(torch.ones(e))

    def forward(self, x: Float[Tensor, "t d"]) -> tuple[Float[Tensor, "t k"], Int[Tensor, "t k"]]:
        h = self.norm(x) * self.scale * self.root
        probs = torch.softmax(self.proj(h), dim=-1, dtype=torch.float32)
        w, idx = torch.topk(probs, k=self.k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        return w * self.per_expert_scale[idx], idx


class RoutedExperts(nn.Module):
    """Experts applied in routed form: gather the k chosen weight slices, then batched matmuls."""

    def __init__(self, spec: TextSpec):
        super().__init__()
        e, d, inner = spec.num_experts, spec.hidden_size, spec.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * inner, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, inner))

    def forward(
        self, x: Float[Tensor, "t d"], idx: Int[Tensor, "t k"], w: Float[Tensor, "t k"]
    ) -> Float[Tensor, "t d"]:
        gate_up = torch.matmul(self.gate_up_proj[idx], x[:, None, :, None]).squeeze(-1)  # contract over d
        gate, up = gate_up.chunk(2, dim=-1)
        act = nn.functional.gelu(gate, approximate="tanh") * up
        out = torch.matmul(self.down_proj[idx], act[..., None]).squeeze(-1)  # contract over inner
        return (out * w[..., None].to(out.dtype)).sum(dim=1)


class Layer(nn.Module):
    """One Gemma 4 / DiffusionGemma layer (the same computation in encoder and decoder)."""

    def __init__(self, spec: TextSpec, i: int):
        super().__init__()
        d, eps = spec.hidden_size, spec.rms_norm_eps
        self.self_attn = Attention(spec, i)
        self.mlp = GatedMLP(d, spec.intermediate_size)
        self.input_layernorm = RMSNorm(d, eps)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.pre_feedforward_layernorm = RMSNorm(d, eps)
        self.post_feedforward_layernorm = RMSNorm(d, eps)
        self.moe = spec.num_experts > 0
        if self.moe:
            self.router = Router(spec)
            self.experts = RoutedExperts(spec)
            self.post_feedforward_layernorm_1 = RMSNorm(d, eps)
            self.post_feedforward_layernorm_2 = RMSNorm(d, eps)
            self.pre_feedforward_layernorm_2 = RMSNorm(d, eps)
        self.layer_scalar = nn.Parameter(torch.ones(1))

    def forward(
        self, h: Float[Tensor, "b s d"], positions: Tensor, mask: Tensor, past: tuple[Tensor, Tensor] | None
    ) -> tuple[Float[Tensor, "b s d"], tuple[Tensor, Tensor]]:
        attn, kv = self.self_attn(self.input_layernorm(h), positions, mask, past)
        h = h + self.post_attention_layernorm(attn)
        dense = self.mlp(self.pre_feedforward_layernorm(h))
        if self.moe:
            flat = h.reshape(-1, h.shape[-1])
            w, idx = self.router(flat)
            routed = self.experts(self.pre_feedforward_layernorm_2(flat), idx, w).reshape(h.shape)
            dense = self.post_feedforward_layernorm_1(dense) + self.post_feedforward_layernorm_2(routed)
        h = h + self.post_feedforward_layernorm(dense)
        return h * self.layer_scalar, kv


def _mask(q_pos: Tensor, k_pos: Tensor, causal: bool, window: int | None, dtype: torch.dtype) -> Tensor:
    """Additive mask (0 or -inf); a constant of the positions, so it adds nothing to opaque depth."""
    diff = q_pos[:, None] - k_pos[None, :]
    allowed = diff >= 0 if causal else torch.ones_like(diff, dtype=torch.bool)
    if window is not None:
        allowed = allowed & (diff.abs() < window)
    return torch.zeros(diff.shape, dtype=dtype, device=q_pos.device).masked_fill(~allowed, -math.inf)


class GemmaTextStack(nn.Module):
    """Shared weights of the encoder, the decoder (plus self-conditioning) and the AR causal LM."""

    def __init__(self, spec: TextSpec):
        super().__init__()
        d = spec.hidden_size
        self.spec = spec
        self.embed_scale = d**0.5
        self.embed_tokens = nn.Embedding(spec.vocab_size, d)
        self.layers = nn.ModuleList([Layer(spec, i) for i in range(spec.num_hidden_layers)])
        self.norm = RMSNorm(d, spec.rms_norm_eps)
        self.self_conditioning = nn.ModuleDict(
            {
                "pre_norm": RMSNorm(d, spec.rms_norm_eps),
                "mlp": GatedMLP(d, spec.intermediate_size),
                "post_norm": RMSNorm(d, spec.rms_norm_eps, with_scale=False),
            }
        )

    def embed(self, ids: Int[Tensor, "b s"]) -> Float[Tensor, "b s d"]:
        return self.embed_tokens(ids) * self.embed_scale

    def run_layers(
        self, h: Tensor, positions: Tensor, key_positions: Tensor, causal: bool, past: list | None = None
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        kvs = []
        for i, layer in enumerate(self.layers):
            window = self.spec.sliding_window if self.spec.layer_types[i] == "sliding_attention" else None
            mask = _mask(positions, key_positions, causal, window, h.dtype)
            h, kv = layer(h, positions, mask, None if past is None else past[i])
            kvs.append(kv)
        return h, kvs

    def lm_head(self, h: Float[Tensor, "b s d"]) -> Float[Tensor, "b s v"]:
        logits = torch.matmul(self.norm(h), self.embed_tokens.weight.t())
        cap = self.spec.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def encode(self, ids: Int[Tensor, "b p"]) -> list[tuple[Tensor, Tensor]]:
        """Causal encoder pass over the prompt; returns each layer's (k, v) cache."""
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.run_layers(self.embed(ids), pos, pos, causal=True)[1]

    def decode(
        self, canvas: Int[Tensor, "b c"], sc_logits: Float[Tensor, "b c v"], past: list[tuple[Tensor, Tensor]]
    ) -> Float[Tensor, "b c v"]:
        """Bidirectional decoder pass over the canvas, reading the encoder's cache and self-conditioning."""
        p, c = past[0][0].shape[2], canvas.shape[1]
        emb = self.embed(canvas)
        soft = torch.matmul(torch.softmax(sc_logits, dim=-1, dtype=torch.float32), self.embed_tokens.weight)
        sc = self.self_conditioning
        h = sc["post_norm"](emb + sc["mlp"](sc["pre_norm"](soft * self.embed_scale)))
        pos = torch.arange(p, p + c, device=canvas.device)
        keys = torch.arange(p + c, device=canvas.device)
        h, _ = self.run_layers(h, pos, keys, causal=False, past=past)
        return self.lm_head(h)

    def causal_lm(self, ids: Int[Tensor, "b s"]) -> Float[Tensor, "b s v"]:
        """Autoregressive Gemma 4 forward (prefill form: every position's path through cached KV)."""
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.lm_head(self.run_layers(self.embed(ids), pos, pos, causal=True)[0])


class EncoderPass(nn.Module):
    def __init__(self, stack: GemmaTextStack):
        super().__init__()
        self.stack = stack

    def forward(self, prompt_ids: Int[Tensor, "b p"]) -> list[tuple[Tensor, Tensor]]:
        return self.stack.encode(prompt_ids)


class DecoderPass(nn.Module):
    def __init__(self, stack: GemmaTextStack):
        super().__init__()
        self.stack = stack

    def forward(self, canvas_ids: Tensor, sc_logits: Tensor, past: list[tuple[Tensor, Tensor]]) -> Tensor:
        return self.stack.decode(canvas_ids, sc_logits, past)


class DiffusionStepPass(nn.Module):
    """Encoder over the prompt, then one decoder pass: everything between two token-level states."""

    def __init__(self, stack: GemmaTextStack):
        super().__init__()
        self.stack = stack

    def forward(self, prompt_ids: Tensor, canvas_ids: Tensor, sc_logits: Tensor) -> Tensor:
        return self.stack.decode(canvas_ids, sc_logits, self.stack.encode(prompt_ids))


class CausalLMPass(nn.Module):
    def __init__(self, stack: GemmaTextStack):
        super().__init__()
        self.stack = stack

    def forward(self, ids: Tensor) -> Tensor:
        return self.stack.causal_lm(ids)


def build_stack(spec: TextSpec) -> GemmaTextStack:
    """Builds the stack on the meta device (no weight memory, any size)."""
    with torch.device("meta"):
        return GemmaTextStack(spec)
