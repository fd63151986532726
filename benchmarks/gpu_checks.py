"""The GPU checks of issue #23 in one run, printing a table (CPU-runnable with `--device cpu --tiny`).

1. Equivalence with transformers, float32 and bfloat16: the tiny test configs (logits, seeded tokens)
   and the two-layer full-width slice of the 26B config (skipped with --tiny).
2. The full 30-layer random 26B-A4B config in bf16 on one device (with --tiny: the tiny "mixed"
   config): build time, peak device memory / weight bytes, decoder pass and generate step vs
   transformers (both models share one set of weights), `generate_with_cache` of every
   `hook_resid_post` for 48 steps to disk, and a frozen patch sweep's cost per cell.

    python benchmarks/gpu_checks.py --device cuda            # on a GPU (benchmarks/gpu.sh)
    python benchmarks/gpu_checks.py --device cpu --tiny      # the same code path on CPU, small models
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the reference builders the tests use

from reference import CANVAS, CONFIGS, build_reference  # noqa: E402
from test_full_width import FULL_WIDTH_TWO_LAYERS, build_random_full_width_reference  # noqa: E402
from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig  # noqa: E402

from diffusionlens import HookedDiffusionGemma, ReplayNoise  # noqa: E402
from diffusionlens.patching import LogitDiff, patch_sweep, record_run  # noqa: E402

REAL_CONFIG = ROOT / "diffusionlens/serial_depth/diffusiongemma_26b_a4b_text.json"
ROWS: list[tuple[str, str, str]] = []


def row(check: str, value: str, note: str = "") -> None:
    ROWS.append((check, value, note))
    print(f"{check:<58} {value:>14}  {note}", flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str, repeats: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def sampler_settings(canvas: int, steps: int) -> dict:
    return dict(
        max_new_tokens=canvas,
        max_denoising_steps=steps,
        entropy_bound=0.4,
        stability_threshold=0,
        confidence_threshold=1e-6,
        pad_token_id=0,
        eos_token_id=None,
    )


def reference_generate(reference, ids, settings):
    kw = dict(settings)
    kw["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=float(kw.pop("entropy_bound")))
    return reference.generate(ids, **kw).sequences


def compare(label: str, reference, ours, vocab: int, canvas: int, device: str) -> None:
    """Logits bit-identical (or max |diff|) and seeded tokens identical, ours vs transformers."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, vocab, (2, 7), generator=g).to(device)
    canvas_ids = torch.randint(0, vocab, (2, canvas), generator=g).to(device)
    with torch.no_grad():
        expected = reference(input_ids=prompt, decoder_input_ids=canvas_ids).logits
        logits = ours(prompt, canvas_ids)
    diff = float((logits - expected).abs().max())
    row(f"{label}: logits", "identical" if diff == 0 else f"max|d| {diff:.2e}")
    settings = sampler_settings(canvas, 4)
    torch.manual_seed(3)
    expected_tokens = reference_generate(reference, prompt, settings)
    torch.manual_seed(3)
    tokens = ours.generate(prompt, progress=False, **settings).sequences
    row(f"{label}: seeded tokens", "identical" if torch.equal(tokens, expected_tokens) else "DIFFER")


def equivalence(device: str, tiny: bool) -> None:
    # bf16 matmuls on CPU are far too slow to be worth checking there; float32 runs everywhere.
    dtypes = (torch.float32, torch.bfloat16) if device.startswith("cuda") else (torch.float32,)
    for dtype in dtypes:
        short = str(dtype).removeprefix("torch.")
        for name in CONFIGS:
            reference = build_reference(name, dtype=dtype).to(device)
            ours = HookedDiffusionGemma.from_pretrained(reference, progress=False)
            try:
                compare(f"{name} {short}", reference, ours, CONFIGS[name]["vocab_size"], CANVAS[name], device)
            except RuntimeError as error:  # e.g. grouped_mm needs 16-byte strides, which tiny bf16 experts lack
                row(f"{name} {short}", "not run", str(error).splitlines()[0][:80])
        if not tiny:
            reference = build_random_full_width_reference(device=device, dtype=dtype)
            ours = HookedDiffusionGemma.from_pretrained(reference, progress=False)
            compare(f"full-width 2 layers {short}", reference, ours, FULL_WIDTH_TWO_LAYERS["vocab_size"], 8, device)
            del reference, ours
            gc.collect()
            torch.cuda.empty_cache() if device.startswith("cuda") else None


def full_model(device: str, tiny: bool, steps: int, out: Path) -> None:
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if tiny:
        text, canvas, label = dict(CONFIGS["mixed"]), CANVAS["mixed"], "tiny 'mixed'"
    else:
        # The slice's values with all 30 layers in the real sliding/full pattern.
        raw = json.loads(REAL_CONFIG.read_text())
        layer_types = raw["text_config"]["layer_types"]
        text = dict(FULL_WIDTH_TWO_LAYERS, num_hidden_layers=len(layer_types), layer_types=layer_types)
        canvas, label = raw["canvas_length"], "26B-A4B 30 layers"
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    reference = build_random_full_width_reference(text_config=text, canvas_length=canvas, device=device, dtype=dtype)
    ours = HookedDiffusionGemma.from_pretrained(reference, progress=False)  # aliases the same tensors
    sync(device)
    row(f"{label}: build random weights on {device}", f"{time.perf_counter() - start:.1f} s", str(dtype))
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.decoder.parameters())
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
        row(
            f"{label}: peak GPU memory / weight bytes",
            f"{peak / weight_bytes:.3f}",
            f"weights {weight_bytes / 1e9:.2f} GB",
        )
    vocab = text["vocab_size"]
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, vocab, (1, 64), generator=g).to(device)
    canvas_ids = torch.randint(0, vocab, (1, canvas), generator=g).to(device)
    with torch.no_grad():
        state = ours.encode(prompt)
        t_ours = timed(lambda: ours.denoise(canvas_ids, state), device)
        t_ref = timed(lambda: reference(input_ids=prompt, decoder_input_ids=canvas_ids), device)
    row(
        f"{label}: decoder pass ours / transformers",
        f"{t_ours / t_ref:.3f}",
        f"{t_ours * 1e3:.1f} ms vs {t_ref * 1e3:.1f} ms (ref incl. encoder)",
    )
    settings = sampler_settings(canvas, steps)
    torch.manual_seed(0)
    t_gen = timed(lambda: ours.generate(prompt, progress=False, **settings), device, repeats=1)
    torch.manual_seed(0)
    t_gen_ref = timed(lambda: reference_generate(reference, prompt, settings), device, repeats=1)
    row(
        f"{label}: generate ({steps} steps) ours / transformers",
        f"{t_gen / t_gen_ref:.3f}",
        f"{t_gen / steps * 1e3:.1f} ms/step",
    )
    del reference
    gc.collect()
    names = [f"decoder.blocks.{layer}.hook_resid_post" for layer in range(ours.cfg.num_hidden_layers)]
    with tempfile.TemporaryDirectory(dir=out) as cache_dir:
        start = time.perf_counter()
        _, cache = ours.generate_with_cache(
            prompt,
            names_filter=names,
            storage="disk",
            path=Path(cache_dir) / "cache",
            noise=ReplayNoise(0),
            progress=False,
            **settings,
        )
        sync(device)
        elapsed = time.perf_counter() - start
        on_disk = sum(f.stat().st_size for f in Path(cache_dir).rglob("*") if f.is_file())
    row(
        f"{label}: generate_with_cache every resid_post, disk",
        f"{elapsed / t_gen:.3f} x generate",
        f"{on_disk / 1e9:.3f} GB written, {steps} steps",
    )
    sweep_settings = dict(max_new_tokens=canvas, max_denoising_steps=steps)
    clean = record_run(ours, prompt, names_filter=names[:2], noise=ReplayNoise(0), **sweep_settings)
    corrupted = record_run(ours, prompt.roll(1, dims=1), noise=ReplayNoise(0), **sweep_settings)
    metric = LogitDiff(position=0, good=5, bad=6)
    start = time.perf_counter()
    result = patch_sweep(
        ours,
        clean,
        corrupted,
        "decoder.blocks.{layer}.hook_resid_post",
        ("layer", "position"),
        metric,
        layers=[0, 1],
        positions=[0, 1],
        progress=False,
    )
    sync(device)
    per_cell = (time.perf_counter() - start) / result.values.numel()
    row(
        f"{label}: frozen patch sweep, per cell",
        f"{per_cell * 1e3:.1f} ms",
        f"{per_cell / (t_gen / steps):.2f} x one generate step",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny configs only (a quick CPU check of this script)")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--out", default=tempfile.gettempdir(), help="where the disk cache is written (then removed)")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    equivalence(args.device, args.tiny)
    full_model(args.device, args.tiny, args.steps, Path(args.out))
    print("\n| check | value | note |\n|---|---|---|")
    for check, value, note in ROWS:
        print(f"| {check} | {value} | {note} |")
    if args.json:
        Path(args.json).write_text(json.dumps(ROWS, indent=1))


if __name__ == "__main__":
    main()
