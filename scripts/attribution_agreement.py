"""Attribution patching against exact patching on the toy model (the table in docs/patching.md).

python scripts/attribution_agreement.py [--positions 20]

Clean `squares 400 800:`, corrupted `squares 600 800:`, hook `decoder.blocks.{layer}.hook_resid_pre`,
metric logit('8') - logit('4') at the count's position. Per step of the corrupted run's frozen
trajectory: exact effects from a frozen layer × position `patch_sweep` scored at that step, estimates
from `attribution_patch`; prints Pearson r, sign agreement (over cells whose exact effect is not zero)
and the largest exact effect with its estimate.
"""

from __future__ import annotations

import argparse
import time

import torch

from diffusionlens import HookedDiffusionGemma, ReplayNoise
from diffusionlens.patching import LogitDiff, attribution_patch, patch_sweep, record_run

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--positions", type=int, default=20)
args = parser.parse_args()

model = HookedDiffusionGemma.from_pretrained("toy", progress=False)
tok = model.tokenizer
hook = "decoder.blocks.{layer}.hook_resid_pre"
layers = range(model.cfg.num_hidden_layers)
names = [hook.format(layer=layer) for layer in layers]
settings = dict(max_new_tokens=model.cfg.canvas_length, noise=ReplayNoise(0))
clean = record_run(model, model.to_tokens("squares 400 800:"), names_filter=names, **settings)
corrupted = record_run(model, model.to_tokens("squares 600 800:"), **settings)
eight, four = tok.convert_tokens_to_ids("8"), tok.convert_tokens_to_ids("4")
steps = range(min(clean.trace.steps(0), corrupted.trace.steps(0)))
started = time.perf_counter()
estimate = attribution_patch(model, clean, corrupted, hook, LogitDiff(0, eight, four), steps=steps)
# One forward and one backward pass per step serve every layer x position cell of that step.
attribution_seconds = (time.perf_counter() - started) / len(steps)
positions = range(args.positions)

print(
    "| step | Pearson r | sign agreement | largest exact effect | its attribution estimate "
    "| attribution s/step | exact fast s | exact per-cell s |"
)
print("|---|---|---|---|---|---|---|---|")
for j, step in enumerate(steps):
    metric = LogitDiff(0, eight, four, step=step)
    baseline = metric(corrupted)
    seconds = {}
    for path in ("fast", "reference"):
        started = time.perf_counter()
        exact = patch_sweep(
            model,
            clean,
            corrupted,
            hook,
            ("layer", "position"),
            metric,
            positions=positions,
            metric_steps=[step],
            progress=False,
            path=path,
        ).values
        seconds[path] = time.perf_counter() - started
    exact = (exact - baseline).flatten()
    approx = estimate.values[:, j, : args.positions].flatten()
    r = float(torch.corrcoef(torch.stack([exact, approx]))[0, 1])
    moved = exact.abs() > 1e-3  # cells where patching changes the metric at all
    signs = float((exact[moved].sign() == approx[moved].sign()).float().mean())
    top = int(exact.abs().argmax())
    costs = f"{attribution_seconds:.3f} | {seconds['fast']:.3f} | {seconds['reference']:.3f}"
    print(f"| {step} | {r:.3f} | {signs:.2f} | {exact[top]:+.2f} | {approx[top]:+.2f} | {costs} |")
