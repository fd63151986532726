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

from benchmarks.timing import Timer, sync  # noqa: E402
from diffusionlens import HookedDiffusionGemma, ReplayNoise  # noqa: E402
from diffusionlens.patching import LogitDiff, patch_sweep, record_run  # noqa: E402

REAL_CONFIG = ROOT / "diffusionlens/serial_depth/diffusiongemma_26b_a4b_text.json"
ROWS: list[tuple[str, str, str]] = []
JSON_PATH: list[Path] = []  # set by --json; rewritten after every row so a run cut short keeps its rows


def row(check: str, value: str, note: str = "") -> None:
    ROWS.append((check, value, note))
    print(f"{check:<58} {value:>14}  {note}", flush=True)
    for path in JSON_PATH:
        path.write_text(json.dumps(ROWS, indent=1))


def section(label: str, fn: Callable[[], None]) -> None:
    """Run one group of checks; a failure becomes a row (with its message) and the next group runs."""
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - report and go on: one GPU run must return every row it can
        row(f"{label}: FAILED", type(error).__name__, str(error).splitlines()[0][:160] if str(error) else "")
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


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
    return reference.generate(ids, **kw)


def seeded_generations(ours, reference, prompt: torch.Tensor, settings: dict, seed: int = 0):
    """(outputs, run ours, run transformers'): each call seeds torch, generates, and stores its result in
    `outputs` under "ours" or "reference", so timers can call them repeatedly and compare afterwards."""
    outputs: dict[str, object] = {}

    def ours_generate() -> None:
        torch.manual_seed(seed)
        outputs["ours"] = ours.generate(prompt, progress=False, **settings)

    def reference_generate_once() -> None:
        torch.manual_seed(seed)
        outputs["reference"] = reference_generate(reference, prompt, settings)

    return outputs, ours_generate, reference_generate_once


def compare(label: str, reference, ours, vocab: int, canvas: int, device: str) -> None:
    """Logits bit-identical (or max |diff|) and seeded tokens identical, ours vs transformers."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, vocab, (2, 7), generator=g).to(device)
    canvas_ids = torch.randint(0, vocab, (2, canvas), generator=g).to(device)
    with torch.no_grad():
        expected = reference(input_ids=prompt, decoder_input_ids=canvas_ids).logits
        logits = ours(prompt, canvas_ids)
    diff = float((logits - expected).abs().max())
    scale = float(expected.abs().max())
    row(f"{label}: logits", "identical" if diff == 0 else f"max|d| {diff:.2e}", f"max|logit| {scale:.2f}")
    settings = sampler_settings(canvas, 4)
    torch.manual_seed(3)
    expected_tokens = reference_generate(reference, prompt, settings).sequences
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
            section(f"full-width 2 layers {short}", lambda dtype=dtype, short=short: full_width(device, dtype, short))


def full_width(device: str, dtype: torch.dtype, short: str) -> None:
    reference = build_random_full_width_reference(device=device, dtype=dtype)
    ours = HookedDiffusionGemma.from_pretrained(reference, progress=False)
    compare(f"full-width 2 layers {short}", reference, ours, FULL_WIDTH_TWO_LAYERS["vocab_size"], 8, device)
    if dtype != torch.bfloat16:
        return
    # Load time from a sharded safetensors checkpoint (the 30-layer model's 51 GB would not fit the
    # lease's disk and time): bytes per second here scale to the real checkpoint.
    del reference
    with tempfile.TemporaryDirectory() as directory:
        ours.save_pretrained(directory, max_shard_size="2GB")
        on_disk = sum(f.stat().st_size for f in Path(directory).glob("*.safetensors"))
        del ours
        gc.collect()
        torch.cuda.empty_cache() if device.startswith("cuda") else None
        sync(device)
        start = time.perf_counter()
        loaded = HookedDiffusionGemma.from_pretrained(directory, dtype=dtype, device=device, progress=False)
        sync(device)
        elapsed = time.perf_counter() - start
    rate = on_disk / 1e9 / elapsed
    row(
        f"full-width 2 layers {short}: load sharded checkpoint to {device}",
        f"{elapsed:.1f} s",
        f"{on_disk / 1e9:.2f} GB, {rate:.2f} GB/s (the 26B's 50.5 GB at this rate: {50.5 / rate:.0f} s)",
    )
    del loaded


def steps_taken(output, canvas: int) -> float:
    """Denoising steps of a one-canvas generation, from `tokens_per_forward` (both models report it)."""
    return canvas / float(output.tokens_per_forward.float().mean())


def profile_generate_step(
    ours_generate: Callable[[], None], reference_generate: Callable[[], None], device: str, out: Path, label: str
) -> None:
    """torch.profiler tables of one generate of each model (self time per op, CPU and CUDA), written to
    `out` as `profile_{ours,transformers}.txt`: where a generate-step gap comes from."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    sort_by = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    for name, fn in (("ours", ours_generate), ("transformers", reference_generate)):
        with profile(activities=activities) as prof:
            fn()
            sync(device)
        table = prof.key_averages().table(sort_by=sort_by, row_limit=45, max_name_column_width=70)
        path = out / f"profile_{name}.txt"
        path.write_text(table)
        row(f"{label}: profile of one generate ({name})", "written", str(path))


def full_model(
    device: str, tiny: bool, steps: int, out: Path, generate_repeats: int = 3, profile: bool = False
) -> None:
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    cuda = device.startswith("cuda")
    if tiny:
        text, canvas, label = dict(CONFIGS["mixed"]), CANVAS["mixed"], "tiny 'mixed'"
    else:
        # The slice's values with all 30 layers in the real sliding/full pattern.
        raw = json.loads(REAL_CONFIG.read_text())
        layer_types = raw["text_config"]["layer_types"]
        text = dict(FULL_WIDTH_TWO_LAYERS, num_hidden_layers=len(layer_types), layer_types=layer_types)
        canvas, label = raw["canvas_length"], "26B-A4B 30 layers"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    # Random weights (no hub here): transformers' model on the meta device, filled tensor by tensor on
    # `device`; ours is built from it and aliases the same tensors, so both fit once in memory.
    reference = build_random_full_width_reference(text_config=text, canvas_length=canvas, device=device, dtype=dtype)
    ours = HookedDiffusionGemma.from_pretrained(reference, progress=False)
    sync(device)
    row(f"{label}: build random weights on {device}", f"{time.perf_counter() - start:.1f} s", f"{dtype}, no disk read")
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.decoder.parameters())
    if cuda:
        row(
            f"{label}: peak GPU memory while building / weight bytes",
            f"{torch.cuda.max_memory_allocated() / weight_bytes:.3f}",
            f"weights {weight_bytes / 1e9:.2f} GB",
        )
    vocab = text["vocab_size"]
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, vocab, (1, 64), generator=g).to(device)
    canvas_ids = torch.randint(0, vocab, (1, canvas), generator=g).to(device)
    settings = sampler_settings(canvas, steps)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        state = ours.encode(prompt)
        prompt_kv = reference.model.encoder(input_ids=prompt).past_key_values  # read-only for the decoder
        # Every step after the first also reads the previous step's logits through self-conditioning.
        self_cond = torch.randn(1, canvas, vocab, generator=g).to(device=device, dtype=dtype)
        passes = {
            "decoder pass": (
                lambda: ours.denoise(canvas_ids, state),
                lambda: reference(past_key_values=prompt_kv, decoder_input_ids=canvas_ids),
                f"both read the encoded prompt's KV, canvas {canvas}",
            ),
            "decoder pass with self-conditioning": (
                lambda: ours.denoise(canvas_ids, state, self_cond),
                lambda: reference(
                    past_key_values=prompt_kv, decoder_input_ids=canvas_ids, self_conditioning_logits=self_cond
                ),
                f"canvas {canvas}",
            ),
            "encoder + decoder pass": (
                lambda: ours(prompt, canvas_ids),
                lambda: reference(input_ids=prompt, decoder_input_ids=canvas_ids),
                "prompt 64",
            ),
        }
        for name, (ours_pass, reference_pass, note) in passes.items():
            # Interleaved (ours, transformers, transformers, ours, ...), so clocks and allocator state
            # drift equally on both: one-after-the-other timings of these rows moved by up to 40%.
            t = Timer(device, warmup=1, repeats=3).measure({"ours": ours_pass, "reference": reference_pass})
            row(
                f"{label}: {name} ours / transformers",
                f"{t['ours'] / t['reference']:.3f}",
                f"{t['ours'] * 1e3:.1f} ms vs {t['reference'] * 1e3:.1f} ms; {note}; interleaved, median of 3",
            )
    del self_cond, passes, state, prompt_kv
    outputs, ours_generate, reference_generate_once = seeded_generations(ours, reference, prompt, settings)
    # One generation of ours alone first, for the peak memory of our decoder passes and sampler; the
    # timings come from the interleaved runs below.
    ours_generate()
    sync(device)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        row(
            f"{label}: peak GPU memory (decoder passes + generate) / weight bytes",
            f"{peak / weight_bytes:.3f}",
            f"peak {peak / 1e9:.2f} GB, weights {weight_bytes / 1e9:.2f} GB (shared with transformers' model)",
        )
    # Interleaved (ours, transformers, transformers, ours, ...) after a warm-up of each, so neither run
    # pays for the other's allocator growth or first-use kernel setup.
    generate_times = Timer(device, warmup=1, repeats=generate_repeats).measure(
        {"ours": ours_generate, "reference": reference_generate_once}
    )
    t_gen, t_gen_ref = generate_times["ours"], generate_times["reference"]
    n_ours, n_ref = steps_taken(outputs["ours"], canvas), steps_taken(outputs["reference"], canvas)
    same = torch.equal(outputs["ours"].sequences, outputs["reference"].sequences)
    row(
        f"{label}: generate step ours / transformers",
        f"{(t_gen / n_ours) / (t_gen_ref / n_ref):.3f}",
        f"{t_gen / n_ours * 1e3:.1f} vs {t_gen_ref / n_ref * 1e3:.1f} ms/step; {n_ours:.0f} and {n_ref:.0f} steps; "
        f"tokens {'identical' if same else 'differ'}; interleaved, median of {generate_repeats}",
    )
    # transformers' model shares ours' weights, so keeping it for the profile costs little memory
    names = [f"decoder.blocks.{layer}.hook_resid_post" for layer in range(ours.cfg.num_hidden_layers)]
    with tempfile.TemporaryDirectory(dir=out) as cache_dir:
        torch.manual_seed(0)
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
        recorded = len(cache.steps(0))
        del cache
    row(
        f"{label}: generate_with_cache every resid_post to disk",
        f"{elapsed / t_gen:.2f} x generate",
        f"{elapsed:.1f} s, {on_disk / 1e9:.2f} GB written, {len(names)} hooks x {recorded} steps",
    )
    sweep_settings = dict(max_new_tokens=canvas, max_denoising_steps=steps)
    clean = record_run(ours, prompt, names_filter=names, noise=ReplayNoise(0), **sweep_settings)
    corrupted = record_run(ours, prompt.roll(1, dims=1), noise=ReplayNoise(0), **sweep_settings)
    metric = LogitDiff(position=0, good=5, bad=6)
    layers = list(range(0, ours.cfg.num_hidden_layers, 5))  # spread over the stack; a full 30-layer sweep
    # on the reference path would take minutes of a short GPU lease
    for path in ("reference", "fast"):
        start = time.perf_counter()
        result = patch_sweep(
            ours,
            clean,
            corrupted,
            "decoder.blocks.{layer}.hook_resid_post",
            ("layer", "position"),
            metric,
            layers=layers,
            positions=[0],
            path=path,
            progress=False,
        )
        sync(device)
        per_cell = (time.perf_counter() - start) / result.values.numel()
        row(
            f"{label}: frozen layer sweep over layers {layers[0]}..{layers[-1]} ({path} path), per cell",
            f"{per_cell * 1e3:.1f} ms",
            f"{per_cell / (t_gen / n_ours):.2f} x one generate step, {result.values.numel()} cells",
        )
    if profile:  # last: a lease that ends while it runs still has every other row
        profile_generate_step(ours_generate, reference_generate_once, device, out, label)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny configs only (a quick CPU check of this script)")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--out", default=tempfile.gettempdir(), help="where the disk cache is written (then removed)")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here (after every row)")
    parser.add_argument("--skip-equivalence", action="store_true", help="only the full-model checks")
    parser.add_argument("--generate-repeats", type=int, default=3, help="timed generate runs of each model")
    parser.add_argument(
        "--profile", action="store_true", help="also write torch.profiler tables of one generate of each to --out"
    )
    args = parser.parse_args()
    if args.json:
        JSON_PATH.append(Path(args.json))
        JSON_PATH[0].parent.mkdir(parents=True, exist_ok=True)
    if not args.skip_equivalence:
        section("equivalence", lambda: equivalence(args.device, args.tiny))
    section(
        "full model",
        lambda: full_model(args.device, args.tiny, args.steps, Path(args.out), args.generate_repeats, args.profile),
    )
    print("\n| check | value | note |\n|---|---|---|")
    for check, value, note in ROWS:
        print(f"| {check} | {value} | {note} |")


if __name__ == "__main__":
    main()
