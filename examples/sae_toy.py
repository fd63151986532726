"""A small SAE on the toy model with SAELens: train from a store, splice it in per step, read features.

python examples/sae_toy.py        # about 20 s on a laptop CPU (needs the [sae] extra)

scripts/train_toy_sae.py is the full-size version whose numbers docs/features.md quotes.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from diffusionlens import HookedDiffusionGemma, ReplayNoise
from diffusionlens.features import ActivationStore, generate_with_sae, sae_metrics, top_activations, train_sae
from diffusionlens.toy import make_dataset

HOOK = "decoder.blocks.3.hook_resid_post"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--samples", type=int, default=30_000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(tempfile.mkdtemp())
    model = HookedDiffusionGemma.from_pretrained("toy", progress=False)
    prompts = [e.prompt for e in make_dataset("squares", args.prompts, seed=21, split="eval")]
    store = ActivationStore(out / "store", model, [HOOK], prompts=prompts, batch_size=12, max_denoising_steps=8)
    store.harvest(progress=False)
    sae = train_sae(
        store, HOOK, d_sae=128, training_samples=args.samples, batch_size=512, lr=3e-3, out=out / "sae", progress=False
    )
    metrics = sae_metrics(sae, store, HOOK)
    print(f"{len(store)} rows; explained variance {metrics['explained_variance']:.2f}, L0 {metrics['l0']:.1f}")

    ids, mask = model.to_tokens_and_mask(prompts[:4])
    run = {"attention_mask": mask, "noise": ReplayNoise(0), "progress": False}
    clean = model.generate(ids, **run)
    exact, _, features = generate_with_sae(model, ids, sae, HOOK, use_error_term=True, **run)
    spliced, _, _ = generate_with_sae(model, ids, sae, HOOK, use_error_term=False, **run)
    print("with the error term, same answers:", torch.equal(exact.sequences, clean.sequences))
    same = (spliced.sequences == clean.sequences).all(-1).float().mean()
    print(f"reconstruction only: {100 * same:.0f}% of answers unchanged")
    print("feature activations per step:", tuple(features[HOOK + ".hook_sae_acts_post"].shape))
    examples = top_activations(sae, store, HOOK, k=3, progress=False)
    strongest = int(examples.values[:, 0].argmax())
    print(examples.describe(strongest, store.prompts, lambda i: model.to_string([i])))


if __name__ == "__main__":
    main()
