"""Train one SAE on the shipped toy model and print the numbers quoted in docs/features.md.

python scripts/train_toy_sae.py --out runs/toy_sae            # about 5-10 minutes on 2 CPU cores

Harvests decoder.blocks.3.hook_resid_post over held-out prompts of every task (every step a prompt
ran, every canvas position), trains a SAELens StandardSAE with SAELens's trainer, then reports
explained variance, L0 and dead-feature share on the harvested rows, exact match per task with the
SAE spliced in (no error term) against the clean model, and a few features from their top examples.
The SAE is saved in SAELens's format under OUT/sae (not shipped in git).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from diffusionlens import HookedDiffusionGemma
from diffusionlens.features import ActivationStore
from diffusionlens.features.sae import sae_hooks, sae_metrics, top_activations, train_sae
from diffusionlens.toy import TASKS, make_dataset
from diffusionlens.toy.evaluate import evaluate

HOOK = "decoder.blocks.3.hook_resid_post"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/toy_sae")
    parser.add_argument("--prompts-per-task", type=int, default=60)
    parser.add_argument("--d-sae", type=int, default=768)
    parser.add_argument("--l1", type=float, default=2.0)
    parser.add_argument("--samples", type=int, default=600_000)
    parser.add_argument("--eval-n", type=int, default=40, help="held-out problems per task for exact match")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscribing a shared CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    model = HookedDiffusionGemma.from_pretrained("toy", progress=False)
    # seed 777 draws prompts other than evaluate()'s default seed, so the exact-match problems are unseen
    prompts = [e.prompt for task in TASKS for e in make_dataset(task, args.prompts_per_task, seed=777, split="eval")]
    start = time.time()
    store = ActivationStore(out / "store", model, [HOOK], prompts=prompts, seeds=[0], batch_size=30)
    store.harvest()
    print(f"harvest: {len(store)} rows from {len(prompts)} prompts in {time.time() - start:.0f} s")
    start = time.time()
    sae = train_sae(
        store,
        HOOK,
        d_sae=args.d_sae,
        l1_coefficient=args.l1,
        training_samples=args.samples,
        batch_size=1024,
        lr=1e-3,
        out=out / "sae",
    )
    print(f"training: {args.samples} samples in {time.time() - start:.0f} s")
    metrics = sae_metrics(sae, store, HOOK)
    print(
        f"explained variance {metrics['explained_variance']:.3f}, L0 {metrics['l0']:.1f} of {args.d_sae}, "
        f"dead features {100 * metrics['dead_share']:.1f}%"
    )
    clean = evaluate(model, n=args.eval_n)
    spliced = evaluate(model, n=args.eval_n, fwd_hooks=sae_hooks(sae, HOOK, model=model))
    print("| task | clean | SAE spliced, no error term |\n|---|---|---|")
    for task in TASKS:
        print(f"| {task} | {100 * clean[task].exact_match:.1f}% | {100 * spliced[task].exact_match:.1f}% |")
    examples = top_activations(sae, store, HOOK, k=5)
    alive = (examples.values[:, 0] > 0).nonzero().flatten()
    # features with the strongest top activation, the ones most clearly about something
    show = alive[examples.values[alive, 0].argsort(descending=True)][:: max(1, len(alive) // 6)][:6]
    to_str = lambda i: model.to_string([i])  # noqa: E731
    for feature in show.tolist():
        print(examples.describe(feature, store.prompts, to_str))


if __name__ == "__main__":
    main()
