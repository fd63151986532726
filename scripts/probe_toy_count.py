"""How early is the count of `squares a b:` decodable? Probes per layer and denoising step on the toy.

python scripts/probe_toy_count.py --out runs/probe_count --figure docs/figures/probe_count.png   # ~2 min

Harvests the residual stream at canvas position 0 (where the answer's count digit goes) for held-out
squares prompts, then fits a logistic probe per (layer, step) for the true count (0-8), split by
prompt, and prints held-out accuracy against the majority-class baseline.
"""

from __future__ import annotations

import argparse
import time

import torch

from diffusionlens import HookedDiffusionGemma
from diffusionlens.features import ActivationStore
from diffusionlens.features.probes import train_probe
from diffusionlens.toy import make_dataset, solve

HOOKS = ["decoder.blocks.0.hook_resid_pre"] + [f"decoder.blocks.{layer}.hook_resid_post" for layer in range(6)]
NAMES = ["block 0 input"] + [f"after block {layer}" for layer in range(6)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/probe_count")
    parser.add_argument("--prompts", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--figure", default=None, help="write the heatmap here (needs matplotlib)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = HookedDiffusionGemma.from_pretrained("toy", progress=False)
    prompts = [e.prompt for e in make_dataset("squares", args.prompts, seed=4242, split="eval")]
    start = time.time()
    store = ActivationStore(args.out, model, HOOKS, prompts=prompts, seeds=args.seeds, positions=[0], batch_size=50)
    store.harvest()
    print(f"harvest: {len(store)} rows in {time.time() - start:.0f} s")
    counts = torch.tensor([int(solve(p).split(":")[0]) for p in prompts])
    result = train_probe(store, lambda labels: counts[labels["prompt_id"]], seed=0)
    print(result.table(NAMES))
    if args.figure:
        from diffusionlens.viz.features import plot_probe_accuracy

        fig = plot_probe_accuracy(result, names=NAMES, title="count of squares a b: at canvas position 0")
        fig.savefig(args.figure, dpi=110)


if __name__ == "__main__":
    main()
