"""What a generate step costs beyond its decoder pass, ours vs transformers, measured on CPU.

Issue #23's GPU run found our generate step 1.084x transformers' while the decoder passes were at parity.
This script measures the two host-side suspects on the tiny 'mixed' test config (one thread, 48 steps):

1. time: a step's median time minus one self-conditioned decoder pass (interleaved medians,
   benchmarks/timing.py), i.e. the sampler's and the loop's own work;
2. host synchronisations: tensor calls that make the host wait for the device (`bool`, `int`,
   `item`, `tolist`, `cpu`, ...), counted per step, with where they come from;
3. device work: in one seeded bf16 generation on the 'single_kv' config (6 steps; the copies a 16-bit
   model makes are what the GPU profile found), the copies (calls, bytes) and the ops that write memory,
   each at least one kernel launch on a GPU (tests/op_counts.py; tests/test_bf16.py asserts ours <=).

    python scripts/generate_step_overhead.py
"""

from __future__ import annotations

import collections
import sys
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from op_counts import count_generation  # noqa: E402
from reference import CANVAS, build_pair  # noqa: E402

from benchmarks.gpu_checks import reference_generate, sampler_settings, seeded_generations, steps_taken  # noqa: E402
from benchmarks.timing import Timer  # noqa: E402

SYNCING_METHODS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "cpu", "nonzero")
STEPS = 48
LABELS = {"ours": "ours", "reference": "transformers"}


def count_host_syncs(run) -> collections.Counter:
    """Calls of `SYNCING_METHODS` during `run()`, keyed by method and calling file:line."""
    counts: collections.Counter = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in SYNCING_METHODS}

    def counting(name, original):
        def method(self, *args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]
            counts[
                f"{name} {caller.filename.split('site-packages/')[-1].replace(str(ROOT) + '/', '')}:{caller.lineno}"
            ] += 1
            return original(self, *args, **kwargs)

        return method

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, counting(name, original))
        run()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return counts


def main() -> None:
    torch.set_num_threads(1)
    reference, ours = build_pair("mixed", seed=0)
    canvas, vocab = CANVAS["mixed"], ours.cfg.vocab_size
    prompt = torch.randint(3, 50, (1, 7), generator=torch.Generator().manual_seed(0))
    settings = sampler_settings(canvas, STEPS)
    outputs, ours_generate, reference_generate_once = seeded_generations(ours, reference, prompt, settings)

    with torch.no_grad():
        state = ours.encode(prompt)
        prompt_kv = reference.model.encoder(input_ids=prompt).past_key_values
        canvas_ids = torch.randint(0, vocab, (1, canvas))
        self_cond = torch.randn(1, canvas, vocab)
        passes = Timer("cpu", warmup=2, repeats=15).measure(
            {
                "ours": lambda: ours.denoise(canvas_ids, state, self_cond),
                "reference": lambda: reference(
                    past_key_values=prompt_kv, decoder_input_ids=canvas_ids, self_conditioning_logits=self_cond
                ),
            }
        )
        runs = Timer("cpu", warmup=1, repeats=7).measure({"ours": ours_generate, "reference": reference_generate_once})
        syncs = {"ours": count_host_syncs(ours_generate), "reference": count_host_syncs(reference_generate_once)}
    print(f"tiny 'mixed' config, canvas {canvas}, vocab {vocab}, one CPU thread, {STEPS} steps")
    print("| model | decoder pass | generate step | step - pass | host syncs per step |")
    print("|---|---|---|---|---|")
    for name in ("ours", "reference"):
        steps = steps_taken(outputs[name], canvas)
        step = runs[name] / steps
        per_step = sum(syncs[name].values()) / steps
        print(
            f"| {LABELS[name]} | {passes[name] * 1e3:.3f} ms | {step * 1e3:.3f} ms | "
            f"{(step - passes[name]) * 1e3:+.3f} ms | {per_step:.1f} |"
        )
    for name in ("ours", "reference"):
        print(f"\nhost syncs in one {LABELS[name]} generation ({STEPS} steps), by call site:")
        for site, count in syncs[name].most_common(10):
            print(f"  {count:5d}  {site}")
    print_device_work()


def print_device_work(steps: int = 6) -> None:
    reference, ours = build_pair("single_kv", seed=2, dtype=torch.bfloat16)
    prompt = torch.randint(3, ours.cfg.vocab_size, (1, 7), generator=torch.Generator().manual_seed(0))
    settings = sampler_settings(CANVAS["single_kv"], steps)
    counted = {
        "ours": count_generation(lambda: ours.generate(prompt, progress=False, **settings)),
        "reference": count_generation(lambda: reference_generate(reference, prompt, settings)),
    }
    tokens = "identical" if torch.equal(counted["ours"][0].sequences, counted["reference"][0].sequences) else "DIFFER"
    print(f"\none seeded bf16 generation, 'single_kv' config, {steps} steps, tokens {tokens}:")
    print("| model | copies | bytes copied | ops that write memory |")
    print("|---|---|---|---|")
    for name, (_, copies, writes) in counted.items():
        print(f"| {LABELS[name]} | {copies.calls:,} | {copies.bytes:,} | {writes.calls:,} |")


if __name__ == "__main__":
    main()
