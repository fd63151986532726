"""Opaque serial depth of the toy and its autoregressive twin on their actual runs.

Both models solve the same held-out problems; the script counts what each actually did (denoising steps
per problem for the diffusion toy, tokens generated for the twin), then charges each pass the depth
`diffusionlens.serial_depth` measures on the model's own graph (both built on the meta device from the
library's stack classes; the twin's pass is traced from `HookedGemma4CausalLM` itself).

    python scripts/twin_serial_depth.py --n 50

Two numbers per model, because they answer different questions:
- opaque depth: the longest chain between interpretable states. The twin's chains end at every sampled
  token, so it is one forward pass (+ readout), however many tokens it writes; the diffusion toy chains its
  steps through the self-conditioning logits (naive), or not at all through a token bottleneck.
- total serial depth: every pass in series, tokens x per-token depth for the twin, the encoder and every
  denoising step for the diffusion toy. What a clock would see, not what a reader cannot see.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

from diffusionlens import HookedDiffusionGemma, HookedGemma4CausalLM
from diffusionlens.components.moe import MoE
from diffusionlens.components.stacks import Stack
from diffusionlens.serial_depth import report, serial_depth
from diffusionlens.toy.evaluate import evaluate
from diffusionlens.toy.tasks import TASKS, make_dataset
from diffusionlens.toy.tokenizer import build_tokenizer, encode_prompt
from diffusionlens.toy.twin import evaluate_ar


class TwinTokenPass(nn.Module):
    """One forward pass of the twin over a context (prefill form: the deepest chain a token's pass has)."""

    def __init__(self, model: HookedGemma4CausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        visible = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
        return self.model.head(self.model.causal(ids, visible, None).last_hidden)


def twin_pass_depth(cfg, context: int) -> int:
    """Serial depth of one twin forward over `context` tokens, with the depth module's two switches
    (explicit boolean masks, routed experts; see `diffusionlens.serial_depth.passes`)."""
    with torch.device("meta"):
        twin = HookedGemma4CausalLM(cfg)
    for module in twin.modules():
        if isinstance(module, Stack):
            module.explicit_masks = True
        elif isinstance(module, MoE):
            module.gather_experts = True
    ids = torch.empty(1, context, dtype=torch.long, device="meta")
    return serial_depth(TwinTokenPass(twin), ids).depth


PAPER_NAIVE, PAPER_BOTTLENECK = 28.6, 1.1  # "How Transparent is DiffusionGemma?": 26B vs Gemma 4


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50, help="held-out problems per task")
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--diffusion", default="toy")
    parser.add_argument("--twin", default="toy-ar")
    # the toy's vocabulary has 44 tokens, fewer than the report's default k=64
    parser.add_argument("--readout-k", type=int, default=16, help="k of the top-k readout charged to both")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    diffusion = HookedDiffusionGemma.from_pretrained(args.diffusion, progress=False)
    twin = HookedGemma4CausalLM.from_pretrained(args.twin, progress=False)
    tokenizer = build_tokenizer()
    diff_scores = evaluate(diffusion, n=args.n, seed=args.seed)
    twin_scores = evaluate_ar(twin, n=args.n, seed=args.seed)
    header = (
        "| task | diffusion exact | mean steps | diffusion opaque (naive sc) | diffusion opaque (token bottleneck) "
        "| diffusion total serial | twin exact | mean tokens | twin per-token pass | twin opaque | twin total serial |"
    )
    lines, checks = [header, "|---" * 11 + "|"], []
    ratio_lines = [
        "| task | opaque ratio, naive sc | opaque ratio, token bottleneck | paper (26B vs Gemma 4) "
        "| steps for the toy to reach 28.6x |",
        "|---|---|---|---|---|",
    ]
    for task in TASKS:
        prompt_len = round(
            statistics.mean(
                len(encode_prompt(tokenizer, p)) for p in make_dataset(task, args.n, args.seed, "eval").prompts
            )
        )
        steps = diff_scores[task].mean_steps
        tokens = twin_scores[task].mean_new_tokens
        depth = report(diffusion.cfg, prompt_len=prompt_len, steps=1, readout_k=args.readout_k)
        # compose_depths' formulas, linear in the number of steps, so their mean over problems is the formula
        # at the mean number of steps; the logits processor between steps (temperature) has depth 1.
        naive = depth.step + (steps - 1) * (1 + depth.decoder_from_sc) + depth.readout
        bottleneck = depth.step + depth.readout
        # every pass in series: encoder and first step, then each later decoder pass
        diffusion_total = depth.step + (steps - 1) * (1 + depth.decoder) + depth.readout
        per_token = twin_pass_depth(twin.cfg, prompt_len + round(tokens))
        # The same graph as the report's AR baseline (the diffusion model's encoder class): a consistency check.
        same_context = twin_pass_depth(twin.cfg, prompt_len + diffusion.cfg.canvas_length)
        checks.append(
            f"{task}: twin pass over {prompt_len}+{diffusion.cfg.canvas_length} tokens {same_context}, "
            f"report's CausalLMPass {depth.ar}"
        )
        twin_opaque = per_token + depth.readout
        # Opaque depth grows by one self-conditioned decoder pass per step: solve naive(steps) = 28.6 x twin.
        per_step = 1 + depth.decoder_from_sc
        steps_for_paper = 1 + (PAPER_NAIVE * twin_opaque - depth.step - depth.readout) / per_step
        ratio_lines.append(
            f"| {task} | {naive / twin_opaque:.2f}x | {bottleneck / twin_opaque:.2f}x "
            f"| {PAPER_NAIVE}x / {PAPER_BOTTLENECK}x | {steps_for_paper:.1f} |"
        )
        lines.append(
            f"| {task} | {100 * diff_scores[task].exact_match:.1f}% | {steps:.2f} | {naive:.0f} "
            f"| {bottleneck} | {diffusion_total:.0f} | {100 * twin_scores[task].exact_match:.1f}% | {tokens:.2f} "
            f"| {per_token} | {per_token + depth.readout} | {round(tokens * per_token)} |"
        )
    print(f"n={args.n} held-out problems per task, seed {args.seed}, top-{args.readout_k} readout; serial_depth units")
    print("\n".join(lines))
    print("\n".join(checks))
    print("\nOpaque serial depth, diffusion toy / twin, next to the paper's 26B / Gemma 4 ratios:")
    print("\n".join(ratio_lines))


if __name__ == "__main__":
    main()
