"""Harvest an ActivationStore on the toy model and probe it by layer and denoising step.

python examples/features_store_probe.py        # about 15 s on a laptop CPU

The store holds the residual stream at canvas position 0 of `squares a b:` prompts (where the count
digit goes) at every step each prompt ran; a logistic probe per (layer, step), split by prompt, reads
the digit the model finally writes there. scripts/probe_toy_count.py is the full-size version.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from diffusionlens import HookedDiffusionGemma
from diffusionlens.features import ActivationStore, train_probe
from diffusionlens.toy import make_dataset

HOOKS = ["decoder.blocks.0.hook_resid_pre", "decoder.blocks.2.hook_resid_post", "decoder.blocks.5.hook_resid_post"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=30)
    parser.add_argument("--out", default=None, help="store directory (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = HookedDiffusionGemma.from_pretrained("toy", progress=False)
    prompts = [e.prompt for e in make_dataset("squares", args.prompts, seed=9, split="eval")]
    store = ActivationStore(
        args.out or tempfile.mkdtemp(), model, HOOKS, prompts=prompts, positions=[0], batch_size=20, max_bytes=2**22
    )
    store.harvest(progress=False)  # rerunning with the same --out resumes and adds nothing
    print(store)
    first_batch = next(store.batches(HOOKS[1], 8, seed=0))
    print(f"a shuffled training batch: {tuple(first_batch.shape)}")
    result = train_probe(store, "final_token", progress=False)
    print(result.table(["block 0 input", "after block 2", "after block 5"]))


if __name__ == "__main__":
    main()
