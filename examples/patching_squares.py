"""Where does the toy model decide how many squares lie between 400 and 800?

Clean prompt "squares 400 800:" (answer "8: 441 … 784") against the corrupted "squares 600 800:"
(answer "4: 625 676 729 784"). We patch the clean run's residual stream into the corrupted run, one
(step, position) at a time on the corrupted run's frozen trajectory, and read the logit difference
between "8" and "4" at the count's position at the same step. Then we carry one channel at a time
(canvas tokens, self-conditioning logits, prompt keys/values) from the clean run into a free-running
corrupted run and see which restores the clean count.

    python examples/patching_squares.py [--model toy] [--out patching_squares.png]
"""

import argparse

import torch

from diffusionlens import HookedDiffusionGemma, ReplayNoise
from diffusionlens.patching import CHANNELS, LogitDiff, channel_patches, patch_sweep, record_run, run_patched
from diffusionlens.toy import decode_canvas

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="toy")
parser.add_argument("--out", default="patching_squares.png")
parser.add_argument("--layer", type=int, default=2)
args = parser.parse_args()

model = HookedDiffusionGemma.from_pretrained(args.model, progress=False)
tok = model.tokenizer
clean_ids, corrupted_ids = model.to_tokens("squares 400 800:"), model.to_tokens("squares 600 800:")
hook = f"decoder.blocks.{args.layer}.hook_resid_pre"
channel_hooks = [name for patterns in CHANNELS.values() for name in model.resolve_hook_names(patterns)]
settings = dict(max_new_tokens=model.cfg.canvas_length, noise=ReplayNoise(0))
clean = record_run(model, clean_ids, names_filter=[hook, *channel_hooks], **settings)
corrupted = record_run(model, corrupted_ids, **settings)
print("clean answer:    ", decode_canvas(tok, clean.answer()[0].tolist()))
print("corrupted answer:", decode_canvas(tok, corrupted.answer()[0].tolist()))

eight, four = tok.convert_tokens_to_ids("8"), tok.convert_tokens_to_ids("4")
steps = min(clean.trace.steps(0), corrupted.trace.steps(0))
metric = LogitDiff(position=0, good=eight, bad=four)
sweep = patch_sweep(
    model,
    clean,
    corrupted,
    hook,
    ("step", "position"),
    metric,
    steps=range(steps),
    positions=range(12),
    metric_steps="cell",
    progress=False,
)
baseline = torch.tensor([LogitDiff(0, eight, four, step=s)(corrupted) for s in range(steps)])
effect = sweep.values - baseline[:, None]
row, col = divmod(int(effect.abs().argmax()), effect.shape[1])
print(f"largest effect on logit('8') - logit('4') at the count: step {row}, position {col}: {effect[row, col]:+.2f}")
sweep.values = effect
sweep.plot(title=f"patching {hook}: change in logit('8') - logit('4') at position 0").savefig(args.out, dpi=120)
print(f"heatmap written to {args.out}")

print("\nchannel carried from the clean run -> corrupted run's answer")
for channel in CHANNELS:
    patched = run_patched(model, corrupted, channel_patches(channel, clean.cache))
    print(f"  {channel:9s} -> {decode_canvas(tok, patched.answer()[0].tolist())!r}")
