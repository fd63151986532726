"""Steering the toy's count: add the "4 squares" minus "3 squares" direction at the count position.

python examples/steering_squares.py            # about 20 s on a laptop CPU

The direction is the difference of mean residuals (decoder block LAYER, canvas position 0, every
step) between prompts whose answer has 4 squares and prompts with 3. Added to held-out prompts with
3 squares, during every denoising step, it should turn the count digit "3" into "4" as the
coefficient grows; the sweep prints the share of answers that start with "4" (and "3").
"""

from __future__ import annotations

import argparse

import torch

from diffusionlens import HookedDiffusionGemma, ReplayNoise
from diffusionlens.features.steering import mean_difference, steering_hooks
from diffusionlens.toy import make_dataset

LAYER = 4
HOOK = f"decoder.blocks.{LAYER}.hook_resid_post"


def prompts_with_count(count: int, n: int, seed: int) -> list[str]:
    pool = make_dataset("squares", 40 * n, seed=seed, split="eval").examples
    return [e.prompt for e in pool if e.answer.startswith(f"{count}:")][:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="prompts per set")
    parser.add_argument("--coefficients", type=float, nargs="+", default=[0.0, 1.0, 2.0])
    parser.add_argument("--schedules", action="store_true", help="also compare step schedules at coefficient 2")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = HookedDiffusionGemma.from_pretrained("toy", progress=False)
    run = {"noise": ReplayNoise(0), "progress": False, "max_new_tokens": 48}

    def cache_of(prompts):
        ids, mask = model.to_tokens_and_mask(prompts)
        return model.generate_with_cache(ids, attention_mask=mask, names_filter=[HOOK], positions=[0], **run)[1]

    direction = mean_difference(
        cache_of(prompts_with_count(4, args.n, 1)), cache_of(prompts_with_count(3, args.n, 1)), HOOK
    )
    targets = prompts_with_count(3, args.n, 2)  # other prompts than those the direction came from
    ids, mask = model.to_tokens_and_mask(targets)
    print(
        f"direction: {HOOK} at position 0, norm {direction.norm():.2f}; {len(targets)} held-out prompts with 3 squares"
    )
    clean = model.generate(ids, attention_mask=mask, **run)
    clean_lists = [a.split(":", 1)[-1] for a in model.to_string(clean.sequences[:, ids.shape[1] :], True)]

    def row(label: str, coefficient: float, schedule) -> None:
        hooks = steering_hooks(direction, HOOK, coefficient=coefficient, positions=0, schedule=schedule)
        out = model.generate(ids, attention_mask=mask, fwd_hooks=hooks, **run)
        answers = model.to_string(out.sequences[:, ids.shape[1] :], skip_special_tokens=True)
        four = sum(a.startswith("4:") for a in answers) / len(answers)
        three = sum(a.startswith("3:") for a in answers) / len(answers)
        same_list = sum(a.split(":", 1)[-1] == c for a, c in zip(answers, clean_lists, strict=True)) / len(answers)
        print(f"| {label} | {coefficient:g} | {100 * four:.0f}% | {100 * three:.0f}% | {100 * same_list:.0f}% |")

    print("| schedule | coefficient | count '4' | count '3' | list as unsteered |\n|---|---|---|---|---|")
    for coefficient in args.coefficients:
        row("all steps", coefficient, "all")
    if args.schedules:
        row("first step only", 2.0, ("first", 1))
        row("ramp to 0 at step 3", 2.0, ("ramp", 3))
        row("from step 1 on", 2.0, lambda step: float(step >= 1))


if __name__ == "__main__":
    main()
