"""Regenerate the example figures in docs/figures/ from the toy model.

python scripts/make_figures.py [--prompt "squares 400 800:"] [--seed 0] [--out docs/figures]

Writes token_grid.png, entropy.png, commit_order.png and logit_lens.png. The positions shown are cropped
to the answer (up to and including the first eos of the final canvas), so the figures stay readable.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffusionlens import HookedDiffusionGemma, ReplayNoise
from diffusionlens.viz import plot_commit_order, plot_entropy, plot_logit_lens, plot_token_grid

ROOT = Path(__file__).resolve().parents[1]


def answer_length(final: list[int], eos_id: int) -> int:
    """Positions up to and including the first eos (all of them when there is none)."""
    return final.index(eos_id) + 1 if eos_id in final else len(final)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default="squares 400 800:")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "figures")
    args = parser.parse_args()

    model = HookedDiffusionGemma.from_pretrained("toy", progress=False)
    tokenizer = model.tokenizer
    n_layers = model.cfg.num_hidden_layers
    names = [f"decoder.blocks.{i}.hook_resid_pre" for i in range(n_layers)]
    names.append(f"decoder.blocks.{n_layers - 1}.hook_resid_post")
    result, cache = model.generate_with_cache(
        model.to_tokens(args.prompt),
        names_filter=names,
        max_new_tokens=model.cfg.canvas_length,
        noise=ReplayNoise(args.seed),
        record_top_k=5,
        progress=False,
    )
    trace = result.trace[0]
    crop = answer_length(trace.final[0].tolist(), tokenizer.eos_token_id)
    middle = trace.n_steps // 2
    args.out.mkdir(parents=True, exist_ok=True)
    figures = {
        "token_grid.png": plot_token_grid(trace, tokenizer, max_positions=crop, title=f"draft per step: {args.prompt}"),
        "entropy.png": plot_entropy(trace, tokenizer, max_positions=crop, title=f"entropy: {args.prompt}"),
        "commit_order.png": plot_commit_order(
            trace, tokenizer, max_positions=crop, title=f"commit steps: {args.prompt}"
        ),
        "logit_lens.png": plot_logit_lens(
            cache, middle, tokenizer, max_positions=crop, title=f"logit lens at step {middle}: {args.prompt}"
        ),
    }
    for name, fig in figures.items():
        fig.savefig(args.out / name, dpi=110)
        print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
