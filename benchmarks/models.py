"""The benchmarked model pairs: the same weights in transformers' DiffusionGemma and in ours.

`toy`: the shipped toy checkpoint, loaded by both libraries from its directory.
`200m`: a random ~200M-parameter model with the real 26B-A4B layer pattern (five sliding layers, then
one full layer whose keys double as values), MoE + dense MLP in every block, scaled down from the real
config in `diffusionlens/serial_depth/`. Ours is built with `from_config`, written as transformers
safetensors, and transformers loads that directory, so both hold bit-identical weights.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import DiffusionGemmaForBlockDiffusion
from transformers.utils import logging

import diffusionlens
from diffusionlens import DiffusionGemmaConfig, HookedDiffusionGemma
from diffusionlens.toy import checkpoint_path

REAL_CONFIG = Path(diffusionlens.__file__).parent / "serial_depth" / "diffusiongemma_26b_a4b_text.json"


def real_config() -> DiffusionGemmaConfig:
    return DiffusionGemmaConfig.from_hf(json.loads(REAL_CONFIG.read_text()))


def config_200m() -> DiffusionGemmaConfig:
    """The real config scaled down to ~200M parameters (counted once; encoder and decoder share them).

    Kept from the real model: the 5-sliding-then-1-full layer pattern (twice), full layers with twice
    the head size, fewer key/value heads and k = v, proportional RoPE on a quarter of each full head,
    dense MLP (3/4 of d_model) beside top-k MoE (experts of 1/4 d_model), logit soft-capping.
    Scaled: d_model 2816 -> 768, 30 -> 12 layers, 128 -> 32 experts (top 8 -> 4), vocab 262144 ->
    32768, window 1024 -> 128, canvas 256 -> 64 (so one CPU run stays in minutes).
    """
    real = real_config()
    d = 768
    layers = 12
    return real.replace(
        hidden_size=d,
        num_hidden_layers=layers,
        layer_types=real.layer_types[:layers],
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        global_head_dim=128,
        num_global_key_value_heads=1,
        intermediate_size=d * real.intermediate_size // real.hidden_size,
        num_experts=32,
        top_k_experts=4,
        moe_intermediate_size=d * real.moe_intermediate_size // real.hidden_size,
        vocab_size=32_768,
        sliding_window=128,
        canvas_length=64,
        max_position_embeddings=4096,
    )


def config_55m() -> DiffusionGemmaConfig:
    """The shape the ReplayNoise target was stated for (~55M parameters, canvas 128, vocab 8192, run at
    batch 2), where transformers' sampler adds ~40% to a step and `torch.multinomial` most of that."""
    return config_200m().replace(
        hidden_size=512,
        intermediate_size=384,
        num_experts=16,
        moe_intermediate_size=128,
        vocab_size=8192,
        canvas_length=128,
    )


@dataclass
class Pair:
    """Both models with the same weights, plus the settings the cases use for this model."""

    name: str
    ours: HookedDiffusionGemma
    reference: DiffusionGemmaForBlockDiffusion
    checkpoint: Path
    prompt_len: int
    batch: int
    steps: int
    n_params: int
    weight_bytes: int
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    def prompt(self, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        vocab = self.ours.cfg.vocab_size
        return torch.randint(3, vocab, (self.batch, self.prompt_len), generator=g).to(self.ours.device)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def _load_reference(directory: Path, dtype: torch.dtype, device: str) -> DiffusionGemmaForBlockDiffusion:
    logging.set_verbosity_error()  # the text-only checkpoints have no vision tower: transformers says so at length
    reference = DiffusionGemmaForBlockDiffusion.from_pretrained(str(directory), dtype=dtype)
    return reference.to(device).eval().requires_grad_(False)


def _weight_bytes(model: HookedDiffusionGemma) -> int:
    seen, total = set(), 0
    for t in model.state_dict().values():
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


RANDOM_CONFIGS = {"200m": config_200m, "55m": config_55m}


def _random_pair(cfg: DiffusionGemmaConfig, dtype: torch.dtype, device: str):
    """Ours from a seeded random init, saved as transformers safetensors that transformers then loads."""
    ours = HookedDiffusionGemma.from_config(cfg, seed=0, dtype=dtype, device=device).eval().requires_grad_(False)
    tmp = tempfile.TemporaryDirectory(prefix="diffusionlens-bench-")
    ours.save_pretrained(tmp.name, max_shard_size="100MB")
    return ours, _load_reference(Path(tmp.name), dtype, device), tmp


def build_pair(name: str, *, dtype: torch.dtype, device: str, quick: bool) -> Pair:
    if name == "toy":
        directory = Path(checkpoint_path())
        ours = HookedDiffusionGemma.from_pretrained(directory, dtype=dtype, device=device, progress=False)
        reference = _load_reference(directory, dtype, device)
        tmp = None
        prompt_len, batch, steps = 24, 2, 16 if quick else 32
    elif name in RANDOM_CONFIGS:
        ours, reference, tmp = _random_pair(RANDOM_CONFIGS[name](), dtype, device)
        directory = Path(tmp.name)
        # 200m: a prompt longer than the sliding window, so sliding layers drop prompt keys in both stacks.
        prompt_len, batch, steps = (160, 1, 4 if quick else 8) if name == "200m" else (64, 2, 4 if quick else 8)
    else:
        raise ValueError(f"unknown model {name!r}; choose from toy, 200m, 55m")
    return Pair(
        name,
        ours,
        reference,
        Path(directory),
        prompt_len,
        batch,
        steps,
        ours.cfg.n_params(),
        _weight_bytes(ours),
        tmp,
    )
