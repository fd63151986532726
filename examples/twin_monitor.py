"""Monitor the diffusion toy and its autoregressive twin on the same problems, and probe the twin's future.

python examples/twin_monitor.py                 # about 30 s on a laptop CPU
python examples/twin_monitor.py --model DIR     # another twin checkpoint

After each unit of compute (a denoising step; a generated token) a monitor reads what the run shows and
predicts whether the final answer will be wrong; its AUROC, with a bootstrap interval paired across the
models, is read at fractions of each run's compute. Then a probe per lookahead d reads, from the state the
twin writes token k from, the token it will write at k + d. scripts/twin_monitorability.py and
scripts/twin_transparency.py are the full-size versions (docs/ar_twin.md).
"""

from __future__ import annotations

import argparse

import torch

from diffusionlens import HookedDiffusionGemma, HookedGemma4CausalLM, TokenBottleneck
from diffusionlens.features import CausalRows, train_probe
from diffusionlens.toy import make_dataset
from diffusionlens.toy.monitor import diffusion_monitor_run, fraction_grid, monitor_curves, twin_monitor_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy-ar", help="the twin: 'toy-ar' or a checkpoint directory")
    parser.add_argument("--n", type=int, default=12, help="held-out problems per task")
    args = parser.parse_args()
    torch.set_num_threads(1)
    diffusion = HookedDiffusionGemma.from_pretrained("toy", progress=False)
    twin = HookedGemma4CausalLM.from_pretrained(args.model, progress=False)

    runs = {
        "diffusion": diffusion_monitor_run(diffusion, n=args.n, seed=12345),
        "diffusion + bottleneck": diffusion_monitor_run(
            diffusion, n=args.n, seed=12345, bottleneck=TokenBottleneck(top_k=1)
        ),
        "twin": twin_monitor_run(twin, n=args.n, seed=12345),
    }
    curves = monitor_curves(runs, fraction_grid(4), n_boot=200, reference="twin")
    print("AUROC (final answer wrong) at a fraction f of each run's compute, 95% bootstrap interval:")
    for name, model in curves["models"].items():
        few = " (too few wrong answers for a meaningful interval)" if model["n_wrong"] < 10 else ""
        wrong = f"{model['n_wrong']} wrong of {curves['n_problems']}{few}"
        print(f"  {name}: {wrong}, {model['mean_units']:.1f} units per run")
        for monitor, m in model["monitors"].items():
            cells = [
                f"f={f:g} {a:.2f} [{lo:.2f}, {hi:.2f}]"
                for f, a, (lo, hi) in zip(curves["fractions"], m["auroc"], m["interval"], strict=True)
            ]
            print(f"    {monitor:>10}: " + "  ".join(cells))

    prompts = [p for task in ("sort", "reverse") for p in make_dataset(task, 10, seed=3, split="eval").prompts]
    hook = f"causal.blocks.{twin.cfg.num_hidden_layers - 1}.hook_resid_post"
    rows = CausalRows(twin, hook, prompts=prompts, max_lookahead=3)
    rows.harvest(progress=False)
    print(rows)
    result = train_probe(rows, "final_token", by="lookahead", min_test_rows=5, progress=False)
    print(result.table(["last block"]))


if __name__ == "__main__":
    main()
