"""DiffusionGemmaConfig: the text model's hyper-parameters as one frozen dataclass.

Field names follow transformers' `DiffusionGemmaTextConfig` so that the mapping to and from a
`config.json` is one line per field; TransformerLens-style aliases (`d_model`, `n_layers`, …) are
read-only properties.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, no_type_check

SLIDING = "sliding_attention"
FULL = "full_attention"


_KEPT_TOP_LEVEL_KEYS = ("vision_config", "boi_token_id", "eoi_token_id", "image_token_id", "initializer_range")
_PLACEHOLDER_VISION_CONFIG = {
    "model_type": "gemma4_vision",
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 8,
}


_POSITIVE_INTS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "global_head_dim",
    "num_global_key_value_heads",
    "sliding_window",
    "num_experts",
    "top_k_experts",
    "moe_intermediate_size",
    "max_position_embeddings",
    "canvas_length",
)
_POSITIVE_REALS = ("rms_norm_eps", "final_logit_softcapping", "local_rope_theta", "global_rope_theta")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _real(value: Any, name: str) -> float:
    """A number read from config.json as a float, or a ValueError naming the field (no str -> float parse)."""
    if not _is_real(value):
        raise ValueError(f"Invalid DiffusionGemmaConfig: {name} must be a number, got {value!r}; fix it in config.json")
    return float(value)


def _default_layer_types(num_layers: int) -> tuple[str, ...]:
    # transformers' default: every sixth layer is full attention, and the last one always is.
    types = [SLIDING if (i + 1) % 6 else FULL for i in range(num_layers)]
    types[-1] = FULL
    return tuple(types)


def refuse_sliding_last_layer(layer_types: Sequence[str], consequence: str) -> None:
    """Raise unless the last layer is full attention. transformers' DiffusionGemmaConfig forces it to be
    (with only a logged warning), so a layout ending on a sliding layer means other shapes and another
    model there: converting it either way would silently change the model."""
    if layer_types and layer_types[-1] != FULL:
        raise ValueError(
            f"layer_types ends with {layer_types[-1]!r} ({list(layer_types)}): DiffusionGemma's last layer must be "
            f"{FULL!r} (transformers forces it, changing that layer's shapes), so {consequence}. End layer_types "
            f"with {FULL!r}; a layout ending on a sliding layer works only inside diffusionlens."
        )


# Validated in __post_init__ with messages that name the fix; no_type_check keeps a runtime type
# checker (the tests run one) from pre-empting them with a bare type error.
def config_dict(source: Any, expected: str) -> dict[str, Any]:
    """A transformers config as a plain dict: from the config object, a `config.json` dict (copied), or
    a checkpoint directory / path to its config.json. `expected` starts the TypeError for anything else."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"No config.json at {path}; pass the checkpoint directory or the file")
        return json.loads(path.read_text())
    if isinstance(source, dict):
        return dict(source)
    if not hasattr(source, "to_dict"):
        raise TypeError(f"{expected}, a dict or a path, got {type(source)}")
    return source.to_dict()


@no_type_check
class FieldAlias(property):
    """A TransformerLens name for a config field, read-only: `cfg.d_model` is `cfg.hidden_size`."""

    def __init__(self, field_name: str) -> None:
        super().__init__(lambda cfg: getattr(cfg, field_name), doc=f"`{field_name}`, by its TransformerLens name")
        self.field_name = field_name


@dataclass(frozen=True)
class DiffusionGemmaConfig:
    """Hyper-parameters of DiffusionGemma's text model (encoder and decoder share them).

    Sliding-attention layers use `head_dim` and `num_key_value_heads`; full-attention layers use
    `global_head_dim` and `num_global_key_value_heads`, share one projection for keys and values
    (k = v) and apply proportional RoPE to a `global_partial_rotary_factor` share of each head.
    """

    vocab_size: int = 262_144
    hidden_size: int = 2816
    intermediate_size: int = 2112
    num_hidden_layers: int = 30
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 256
    global_head_dim: int = 512
    num_global_key_value_heads: int | None = 2
    layer_types: tuple[str, ...] | list[str] | None = None  # stored as a tuple after __post_init__
    sliding_window: int = 1024
    num_experts: int = 128
    top_k_experts: int = 8
    moe_intermediate_size: int = 704
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float = 30.0
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 262_144
    local_rope_theta: float = 10_000.0
    global_rope_theta: float = 1_000_000.0
    global_partial_rotary_factor: float = 0.25
    canvas_length: int = 256
    pad_token_id: int | None = 0
    eos_token_id: int | tuple[int, ...] | list[int] | None = 1  # a list is stored as a tuple
    bos_token_id: int | None = 2
    attention_bias: bool = False
    use_bidirectional_attention: str | None = None
    extra_hf_text_config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    extra_hf_config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.layer_types is None and _is_int(self.num_hidden_layers):
            object.__setattr__(self, "layer_types", _default_layer_types(self.num_hidden_layers))
        elif self.layer_types is None:
            object.__setattr__(self, "layer_types", ())
        else:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        self.validate()

    # ----------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise ValueError naming the field and the fix when a value has the wrong type or the shapes
        cannot fit together (types first: the shape checks do arithmetic on them)."""
        problems = self._type_problems()
        if problems:
            raise ValueError(
                "Invalid DiffusionGemmaConfig: "
                + "; ".join(problems)
                + " (fix them in config.json, or in the DiffusionGemmaConfig arguments)"
            )
        if len(self.layer_types) != self.num_hidden_layers:
            problems.append(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers={self.num_hidden_layers}"
            )
        unknown = sorted(set(self.layer_types) - {SLIDING, FULL})
        if unknown:
            problems.append(f"layer_types contains {unknown}; use '{SLIDING}' or '{FULL}'")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.num_attention_heads % self.global_kv_heads:
            problems.append(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_global_key_value_heads={self.global_kv_heads}"
            )
        if not 1 <= self.top_k_experts <= self.num_experts:
            problems.append(f"top_k_experts={self.top_k_experts} must be in 1..num_experts={self.num_experts}")
        if self.sliding_window < 2:
            problems.append(f"sliding_window={self.sliding_window} must be at least 2")
        if self.canvas_length <= 0:
            problems.append(f"canvas_length must be positive, got {self.canvas_length}")
        if self.use_bidirectional_attention == "all":
            problems.append(
                "use_bidirectional_attention='all' (a bidirectional encoder) is not supported by this release; "
                "DiffusionGemma's encoder is causal over text"
            )
        if problems:
            raise ValueError("Invalid DiffusionGemmaConfig: " + "; ".join(problems))

    def _type_problems(self) -> list[str]:
        problems = []
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if name == "num_global_key_value_heads" and value is None:
                continue
            if not _is_int(value) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        for name in _POSITIVE_REALS:
            value = getattr(self, name)
            if not _is_real(value) or not 0 < value < float("inf"):
                problems.append(f"{name} must be a positive number, got {value!r}")
        factor = self.global_partial_rotary_factor
        if not _is_real(factor) or not 0 <= factor <= 1:
            problems.append(
                f"global_partial_rotary_factor (rope_parameters) must be a number in [0, 1], got {factor!r}"
            )
        eos = self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)
        for name, ids in (
            ("pad_token_id", (self.pad_token_id,)),
            ("bos_token_id", (self.bos_token_id,)),
            ("eos_token_id", eos),
        ):
            if not all(i is None or (_is_int(i) and i >= 0) for i in ids):
                problems.append(f"{name} must be a token id (an integer >= 0) or null, got {getattr(self, name)!r}")
        if not isinstance(self.attention_bias, bool):
            problems.append(f"attention_bias must be true or false, got {self.attention_bias!r}")
        if not isinstance(self.hidden_activation, str):
            problems.append(
                f"hidden_activation must be a string such as 'gelu_pytorch_tanh', got {self.hidden_activation!r}"
            )
        return problems

    # ----------------------------------------------------------------- aliases
    d_model = FieldAlias("hidden_size")
    d_vocab = FieldAlias("vocab_size")
    n_layers = FieldAlias("num_hidden_layers")
    n_heads = FieldAlias("num_attention_heads")
    d_mlp = FieldAlias("intermediate_size")

    @property
    def global_kv_heads(self) -> int:
        return self.num_global_key_value_heads or self.num_key_value_heads

    @property
    def embed_scale(self) -> float:
        return self.hidden_size**0.5

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return (self.eos_token_id,) if isinstance(self.eos_token_id, int) else tuple(self.eos_token_id)

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def layer_head_dim(self, layer: int) -> int:
        return self.head_dim if self.is_sliding(layer) else self.global_head_dim

    def layer_kv_heads(self, layer: int) -> int:
        return self.num_key_value_heads if self.is_sliding(layer) else self.global_kv_heads

    def rotary_inv_freq(self, layer_type: str):
        """Inverse RoPE frequencies, `[head_dim // 2]`, computed exactly as transformers does.

        Full layers use proportional RoPE: only the first `partial_rotary_factor` share of the angles
        rotate; the remaining frequencies are zero (cos = 1, sin = 0).
        """
        import torch

        if layer_type == SLIDING:
            dim = self.head_dim
            return 1.0 / (self.local_rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        head_dim = self.global_head_dim
        rope_angles = int(self.global_partial_rotary_factor * head_dim // 2)
        rotated = 1.0 / (
            self.global_rope_theta
            ** (torch.arange(0, 2 * rope_angles, 2, dtype=torch.int64).to(torch.float) / head_dim)
        )
        nope = head_dim // 2 - rope_angles
        return torch.cat((rotated, torch.zeros(nope, dtype=torch.float32))) if nope > 0 else rotated

    def replace(self, **changes: Any) -> DiffusionGemmaConfig:
        return replace(self, **changes)

    # ----------------------------------------------------------------- HF round trip
    @classmethod
    def from_hf(cls, source: Any) -> DiffusionGemmaConfig:
        """Build from a transformers config object, a `config.json` dict, or a path to one."""
        top = config_dict(source, "from_hf expects a transformers config")
        if top.get("model_type") == "gemma4_text" or "Gemma4ForCausalLM" in (top.get("architectures") or ()):
            raise ValueError(
                "This is a Gemma 4 causal LM (Gemma4ForCausalLM) config, not a DiffusionGemma one; load it with "
                "diffusionlens.HookedGemma4CausalLM.from_pretrained"
            )
        text = dict(top.get("text_config") or top)
        # `is not None`, not `or`: a canvas_length of 0 is an error to report, not a missing value.
        canvas_length = next((c for c in (top.get("canvas_length"), text.get("canvas_length")) if c is not None), 256)
        cfg = cls._from_text_dict(text, canvas_length)
        top_extra = {k: v for k, v in top.items() if k in _KEPT_TOP_LEVEL_KEYS}
        return replace(cfg, extra_hf_config=top_extra)

    @classmethod
    def _from_text_dict(cls, text: dict[str, Any], canvas_length: int) -> DiffusionGemmaConfig:
        layer_types = text.get("layer_types")
        refuse_sliding_last_layer(layer_types or (), "transformers would load this config.json differently")
        if text.get("per_layer_config") is not None:
            # transformers serialises only the overrides that differ from the base values, so a full
            # layer without an entry uses the sliding layers' head_dim and key-value heads.
            per_layer = {int(k): v for k, v in text["per_layer_config"].items() if str(k).isdigit()}
            full_layers = [i for i, t in enumerate(layer_types or []) if t == FULL]
            overrides = [per_layer.get(i, {}) for i in full_layers] or [{}]
            head_dims = {o.get("head_dim", text.get("head_dim", 256)) for o in overrides}
            kv_heads = {o.get("num_key_value_heads", text.get("num_key_value_heads", 4)) for o in overrides}
            if len(head_dims) > 1 or len(kv_heads) > 1:
                raise ValueError(f"full-attention layers with different shapes are not supported: {per_layer}")
            global_head_dim, global_kv = head_dims.pop(), kv_heads.pop()
        else:  # a config that predates per_layer_config: transformers' constructor defaults
            global_head_dim = text.get("global_head_dim", 512)
            global_kv = text.get("num_global_key_value_heads")
        rope = text.get("rope_parameters") or {}
        local_rope = rope.get(SLIDING) or {"rope_type": "default", "rope_theta": 10_000.0}
        global_rope = rope.get(FULL) or {"rope_type": "proportional", "partial_rotary_factor": 0.25}
        for kind, params, expected in ((SLIDING, local_rope, "default"), (FULL, global_rope, "proportional")):
            if params.get("rope_type", expected) != expected or params.get("factor", 1.0) != 1.0:
                raise ValueError(f"Unsupported RoPE for {kind}: {params}; expected rope_type='{expected}'")
        known = {f.name for f in fields(cls)}
        used = {
            "rope_parameters",
            "per_layer_config",
            "global_head_dim",
            "num_global_key_value_heads",
            "canvas_length",  # read by from_hf, which looks for it at the top level first
            "model_type",
            "transformers_version",
            "architectures",
            "dtype",
            "torch_dtype",
        }
        kwargs = {k: v for k, v in text.items() if k in known and k not in used}
        extra = {k: v for k, v in text.items() if k not in known and k not in used}
        if kwargs.get("num_experts") is None or kwargs.get("top_k_experts") is None:
            raise ValueError("DiffusionGemma configs must set num_experts, top_k_experts and moe_intermediate_size")
        return cls(
            **kwargs,
            global_head_dim=global_head_dim,
            num_global_key_value_heads=global_kv,
            local_rope_theta=_real(local_rope.get("rope_theta", 10_000.0), f"rope_parameters.{SLIDING}.rope_theta"),
            global_rope_theta=_real(global_rope.get("rope_theta", 1_000_000.0), f"rope_parameters.{FULL}.rope_theta"),
            global_partial_rotary_factor=_real(
                global_rope.get("partial_rotary_factor", 1.0), f"rope_parameters.{FULL}.partial_rotary_factor"
            ),
            canvas_length=canvas_length,
            extra_hf_text_config=extra,
        )

    def to_hf_text_dict(self) -> dict[str, Any]:
        """The `text_config` section of a transformers `config.json`; refuses a layout transformers cannot hold."""
        refuse_sliding_last_layer(self.layer_types, "this config has no transformers counterpart")
        own = asdict(self)
        drop = {
            "global_head_dim",
            "num_global_key_value_heads",
            "local_rope_theta",
            "global_rope_theta",
            "global_partial_rotary_factor",
            "canvas_length",
            "extra_hf_text_config",
            "extra_hf_config",
        }
        text = {k: v for k, v in own.items() if k not in drop}
        text["layer_types"] = list(self.layer_types)
        if isinstance(self.eos_token_id, tuple):
            text["eos_token_id"] = list(self.eos_token_id)
        text["model_type"] = "diffusion_gemma_text"
        text["tie_word_embeddings"] = True
        text["rope_parameters"] = {
            SLIDING: {"rope_type": "default", "rope_theta": self.local_rope_theta},
            FULL: {
                "rope_type": "proportional",
                "partial_rotary_factor": self.global_partial_rotary_factor,
                "rope_theta": self.global_rope_theta,
            },
        }
        override = {"head_dim": self.global_head_dim, "num_key_value_heads": self.global_kv_heads}
        text["per_layer_config"] = {str(i): dict(override) for i, t in enumerate(self.layer_types) if t == FULL}
        return {**self.extra_hf_text_config, **text}

    def to_hf(self) -> dict[str, Any]:
        """A complete DiffusionGemma `config.json` dict (text-only: no vision weights are written)."""
        return {
            # transformers builds a vision tower from this section; a checkpoint that had one keeps it,
            # a text-only model gets a one-layer placeholder so loading it in transformers stays cheap.
            "vision_config": dict(_PLACEHOLDER_VISION_CONFIG),
            **self.extra_hf_config,
            "architectures": ["DiffusionGemmaForBlockDiffusion"],
            "model_type": "diffusion_gemma",
            "canvas_length": self.canvas_length,
            "tie_word_embeddings": True,
            "text_config": self.to_hf_text_dict(),
        }

    def n_params(self) -> int:
        """Parameters of the text model counted once (encoder and decoder share weights)."""
        d = self.hidden_size
        total = self.vocab_size * d + d  # embedding (tied head) + final norm
        total += 2 * d * self.intermediate_size + d * self.intermediate_size + d  # self-conditioning
        for layer in range(self.num_hidden_layers):
            hd, kv = self.layer_head_dim(layer), self.layer_kv_heads(layer)
            n_kv_proj = 2 if self.is_sliding(layer) else 1
            total += d * self.num_attention_heads * hd * 2 + n_kv_proj * d * kv * hd + 2 * hd
            total += 3 * d * self.intermediate_size + 7 * d
            total += d * self.num_experts + d + self.num_experts
            total += self.num_experts * 3 * d * self.moe_intermediate_size
        return total

    def __hash__(self) -> int:  # extra_hf_text_config is a dict; hash the rest
        return hash(tuple(getattr(self, f.name) for f in fields(self) if f.compare))
