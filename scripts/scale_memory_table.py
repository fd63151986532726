"""Print the memory table of docs/scale.md for the 26B-A4B config: weights (and their split under
accelerate's plans), one decoder pass's activations, and DenoisingCaches of N hooks × 48 steps.

Nothing is allocated: weights are sized on the meta device (accelerate's `compute_module_sizes`),
activations and caches with `estimate_cache_bytes` from the hook shapes.

    python scripts/scale_memory_table.py [--prompt-len 1024] [--batch 1]
"""

from __future__ import annotations

import argparse
import warnings

import torch

from diffusionlens import DiffusionGemmaConfig
from diffusionlens.hooks.shapes import estimate_cache_bytes, hook_specs
from diffusionlens.weights.device_map import describe, plan_device_map, unit_bytes

REAL_CONFIG = "diffusionlens/serial_depth/diffusiongemma_26b_a4b_text.json"
GB = 1e9


def prompt_kv_bytes(cfg: DiffusionGemmaConfig, prompt_len: int, batch: int, dtype: torch.dtype) -> int:
    """The encoder's keys and values the decoder reads at every step (sliding layers keep a window)."""
    total = 0
    for layer, kind in enumerate(cfg.layer_types):
        specs = hook_specs(cfg, batch, prompt_len)
        k = specs[f"encoder.blocks.{layer}.attn.hook_k"]
        kept = min(prompt_len, cfg.sliding_window - 1) if kind == "sliding_attention" else prompt_len
        total += 2 * k.nbytes(dtype) // prompt_len * kept
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=48)
    args = parser.parse_args()
    cfg = DiffusionGemmaConfig.from_hf(REAL_CONFIG)
    bf16 = torch.bfloat16
    rows = []
    for dtype in (bf16, torch.float32):
        rows.append((f"weights, {str(dtype).removeprefix('torch.')}", sum(unit_bytes(cfg, dtype).values())))
    specs = hook_specs(cfg, args.batch, args.prompt_len)
    decoder_hooks = [n for n in specs if n.startswith("decoder.")]
    one = dict(batch=args.batch, prompt_len=args.prompt_len, dtype=bf16)
    rows.append(
        (f"prompt keys/values, {args.prompt_len} tokens", prompt_kv_bytes(cfg, args.prompt_len, args.batch, bf16))
    )
    rows.append(
        (
            f"one decoder pass, every hook value ({len(decoder_hooks)} hooks; an upper bound on live activations)",
            estimate_cache_bytes(cfg, decoder_hooks, steps=1, **one),
        )
    )
    rows.append(("one decoder pass, fp32 logits [batch, canvas, vocab]", specs["decoder.hook_logits"].nbytes(bf16)))
    resid_post = [f"decoder.blocks.{layer}.hook_resid_post" for layer in range(cfg.num_hidden_layers)]
    for label, names in [
        ("1 hook (one hook_resid_post)", resid_post[:1]),
        (f"{len(resid_post)} hooks (every hook_resid_post)", resid_post),
        (f"{len(decoder_hooks)} hooks (every decoder hook)", decoder_hooks),
    ]:
        rows.append((f"cache, {label} × {args.steps} steps", estimate_cache_bytes(cfg, names, steps=args.steps, **one)))
    rows.append(
        (
            f"cache, every hook_resid_post × {args.steps} steps, 1 position",
            estimate_cache_bytes(cfg, resid_post, steps=args.steps, positions=1, **one),
        )
    )
    print(f"26B-A4B, batch {args.batch}, prompt {args.prompt_len}, canvas {cfg.canvas_length}, bf16 activations\n")
    print("| quantity | GB |\n|---|---|")
    for label, nbytes in rows:
        print(f"| {label} | {nbytes / GB:.3f} |")
    print("\nbf16 weights under `device_map='auto'` (accelerate's plan):\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for budget in ({0: "80GB"}, {0: "48GB", 1: "48GB"}, {i: "24GB" for i in range(4)}):
            plan = plan_device_map(cfg, "auto", dict(budget), dtype=bf16)
            shown = " + ".join(f"{v}" for v in budget.values())
            print(f"- max_memory {shown}:\n  - " + describe(plan, cfg, bf16).replace("\n", "\n  - "))


if __name__ == "__main__":
    main()
