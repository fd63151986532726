"""Monitorability of the diffusion toy (with and without the token bottleneck) and its autoregressive twin.

    python scripts/twin_monitorability.py --model toy-ar          # ~10 min on one CPU thread at --n 500

All three runs solve the same held-out problems (n per task, seed 12345, the problems `diffusionlens
evaluate` scores). After each unit of compute (a denoising step; a generated token) a monitor reads what
the run shows (the draft canvas; the answer written so far) and predicts (a) whether the final answer will
be wrong (`check`: the readout checked with the task's solver; `confidence`: the largest answer-token
entropy so far, no solver) and (b) what the answer will be (share of its tokens already in place; the
readout is the final answer). Both are read at fractions of each run's own compute, with bootstrap
intervals over problems, paired across the three runs. Writes the numbers to --out (JSON), the figure to
--figure, and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffusionlens import HookedDiffusionGemma, HookedGemma4CausalLM, TokenBottleneck
from diffusionlens.toy.monitor import (
    MONITORS,
    diffusion_monitor_run,
    fraction_grid,
    json_safe,
    monitor_curves,
    twin_monitor_run,
)
from diffusionlens.toy.tasks import TASKS

FIGURES = Path(__file__).parents[1] / "docs" / "figures"
TABLE_FRACTIONS = (0.25, 0.5, 0.75, 0.9, 1.0)
MONITOR_TITLES = {
    "check": "(a) check monitor: readout checked by the task's solver",
    "confidence": "(a) confidence monitor: max answer-token entropy so far",
}


def _cell(point: float, interval: list[float]) -> str:
    return f"{point:.2f} [{interval[0]:.2f}, {interval[1]:.2f}]"


def tables(curves: dict) -> str:
    """Markdown tables of the AUROCs, the paired differences and the answer readout at a few fractions."""
    fractions = curves["fractions"]
    cols = [fractions.index(f) for f in TABLE_FRACTIONS if f in fractions]
    head = "| run | monitor | " + " | ".join(f"f = {fractions[c]:g}" for c in cols) + " | mean over f < 1 |"
    rule = "|---" * (len(cols) + 3) + "|"
    lines = [head, rule]
    for name, model in curves["models"].items():
        for monitor in MONITORS:
            m = model["monitors"][monitor]
            cells = [_cell(m["auroc"][c], m["interval"][c]) for c in cols]
            lines.append(
                f"| {name} | {monitor} | " + " | ".join(cells) + f" | {_cell(m['early'], m['early_interval'])} |"
            )
    lines += ["", f"Paired differences (run − {curves['reference']}):", "", head, rule]
    for name, by_monitor in curves["difference"].items():
        for monitor in MONITORS:
            d = by_monitor[monitor]
            cells = [_cell(d["auroc"][c], d["interval"][c]) for c in cols]
            lines.append(
                f"| {name} | {monitor} | " + " | ".join(cells) + f" | {_cell(d['early'], d['early_interval'])} |"
            )
    lines += ["", "(b) what the answer will be:", ""]
    lines += [
        "| run | readout | " + " | ".join(f"f = {fractions[c]:g}" for c in cols) + " |",
        "|---" * (len(cols) + 2) + "|",
    ]
    for name, model in curves["models"].items():
        for what, label in (("agreement", "tokens in place"), ("exact", "is the final answer")):
            r = model["readout"][what]
            lines.append(
                f"| {name} | {label} | " + " | ".join(_cell(r["mean"][c], r["interval"][c]) for c in cols) + " |"
            )
    if curves["units"]:
        lines += [
            "",
            "The same monitors after u units of compute for every problem (a finished run shows its final answer):",
            "",
        ]
        lines += ["| run | monitor | " + " | ".join(f"u = {u}" for u in curves["units"]) + " |"]
        lines += ["|---" * (len(curves["units"]) + 2) + "|"]
        for name, model in curves["models"].items():
            for monitor in MONITORS:
                m = model["by_units"][monitor]
                cells = [_cell(p, i) for p, i in zip(m["auroc"], m["interval"], strict=True)]
                lines.append(f"| {name} | {monitor} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(curves: dict) -> str:
    lines = [
        "| run | exact match | wrong | mean units of compute |",
        "|---|---|---|---|",
    ]
    for name, model in curves["models"].items():
        unit = "steps" if model["kind"] == "diffusion" else "tokens"
        lines.append(
            f"| {name} | {100 * model['exact_match']:.1f}% | {model['n_wrong']} of {curves['n_problems']} "
            f"| {model['mean_units']:.2f} {unit} |"
        )
    return "\n".join(lines)


def verdicts(curves: dict, fraction: float | None = None) -> list[str]:
    """One line per (run, monitor): does the paired interval of the AUROC difference exclude 0? At one
    fraction of compute, or (None) for the mean over the fractions before the answer is final."""
    out = []
    where = "mean over f < 1" if fraction is None else f"f = {fraction:g}"
    for name, by_monitor in curves["difference"].items():
        for monitor in MONITORS:
            d = by_monitor[monitor]
            if fraction is None:
                point, (lo, hi) = d["early"], d["early_interval"]
            else:
                index = curves["fractions"].index(fraction)
                point, (lo, hi) = d["auroc"][index], d["interval"][index]
            if point != point:
                out.append(
                    f"{name} − {curves['reference']}, {monitor} monitor, {where}: undefined (a run has no wrong answer)"
                )
                continue
            word = "higher than" if lo > 0 else "lower than" if hi < 0 else "not distinguishable from"
            out.append(
                f"{name} − {curves['reference']}, {monitor} monitor, {where}: AUROC difference {point:+.3f} "
                f"[{lo:+.3f}, {hi:+.3f}] -> {word} {curves['reference']}"
            )
    return out


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = curves["fractions"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colours = {"diffusion": "C0", "diffusion + bottleneck": "C2", "twin": "C3"}
    for ax, monitor in zip(axes[:2], MONITORS, strict=True):
        for name, model in curves["models"].items():
            m = model["monitors"][monitor]
            lo, hi = zip(*m["interval"], strict=True)
            colour = colours.get(name)
            ax.step(fractions, m["auroc"], where="post", label=name, color=colour)
            ax.fill_between(fractions, lo, hi, step="post", alpha=0.2, color=colour)
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set(xlabel="fraction of the run's compute spent", ylabel="AUROC (final answer wrong)", ylim=(0.3, 1.02))
        ax.set_title(MONITOR_TITLES[monitor], fontsize=9)
    ax = axes[2]
    for name, model in curves["models"].items():
        for what, style in (("agreement", "-"), ("exact", "--")):
            r = model["readout"][what]
            lo, hi = zip(*r["interval"], strict=True)
            ax.step(fractions, r["mean"], where="post", ls=style, color=colours.get(name), label=f"{name}: {what}")
            ax.fill_between(fractions, lo, hi, step="post", alpha=0.15, color=colours.get(name))
    ax.set(xlabel="fraction of the run's compute spent", ylabel="share of problems / tokens", ylim=(-0.02, 1.02))
    ax.set_title("(b) final answer in the readout: tokens in place (—), all of it (--)", fontsize=9)
    axes[0].legend(fontsize=8, loc="lower right")
    axes[2].legend(fontsize=7, loc="upper left")
    fig.suptitle(
        f"{curves['n_problems']} held-out problems, {100 * curves['level']:.0f}% bootstrap intervals "
        f"({curves['n_boot']} resamples, paired across runs)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy-ar", help="the twin: 'toy-ar' (shipped) or a checkpoint directory")
    parser.add_argument("--diffusion", default="toy", help="the diffusion toy: 'toy' or a checkpoint directory")
    parser.add_argument("--n", type=int, default=500, help="held-out problems per task")
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--bottleneck-k", type=int, default=1, help="TokenBottleneck(top_k=k) for the bottlenecked run")
    parser.add_argument("--points", type=int, default=20, help="fractions of compute: 1/points, 2/points, ... 1")
    parser.add_argument("--units", type=int, nargs="*", default=[1, 2, 3, 5, 10], help="absolute units of compute")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--out", default=str(FIGURES / "twin_monitorability.json"))
    parser.add_argument("--figure", default=str(FIGURES / "twin_monitorability.png"), help="'' for none")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    progress = not args.no_progress
    diffusion = HookedDiffusionGemma.from_pretrained(args.diffusion, progress=False)
    twin = HookedGemma4CausalLM.from_pretrained(args.model, progress=False)
    common = {"n": args.n, "seed": args.seed, "tasks": args.tasks, "progress": progress}
    start = time.time()
    runs = {
        "diffusion": diffusion_monitor_run(diffusion, batch_size=args.batch_size, **common),
        "diffusion + bottleneck": diffusion_monitor_run(
            diffusion, batch_size=args.batch_size, bottleneck=TokenBottleneck(top_k=args.bottleneck_k), **common
        ),
        "twin": twin_monitor_run(twin, **common),
    }
    seconds = time.time() - start
    curves = monitor_curves(runs, fraction_grid(args.points), units=args.units, n_boot=args.n_boot, reference="twin")
    per_task = {}
    for task in args.tasks:
        keep = [i for i, t in enumerate(runs["twin"].tasks) if t == task]
        per_task[task] = monitor_curves(
            {name: run.subset(keep) for name, run in runs.items()}, curves["fractions"], n_boot=args.n_boot
        )["models"]
    curves["per_task"] = per_task
    # the bottleneck's own effect: paired against the same diffusion toy without it
    paired = monitor_curves(
        {"diffusion + bottleneck": runs["diffusion + bottleneck"], "diffusion": runs["diffusion"]},
        curves["fractions"],
        n_boot=args.n_boot,
        reference="diffusion",
    )
    curves["bottleneck_vs_naive"] = {key: paired[key] for key in ("fractions", "reference", "difference")}
    curves["settings"] = {
        "model": str(args.model),
        "diffusion": str(args.diffusion),
        "n_per_task": args.n,
        "seed": args.seed,
        "tasks": args.tasks,
        "bottleneck": f"TokenBottleneck(top_k={args.bottleneck_k})",
        "generation_seconds": round(seconds, 1),
    }
    print(f"twin {args.model}, diffusion {args.diffusion}; n={args.n} per task, seed {args.seed}")
    print(summary(curves))
    print()
    print(tables(curves))
    print()
    for fraction in (None, 0.5):
        print("\n".join(verdicts(curves, fraction)))
        print("\n".join(verdicts(curves["bottleneck_vs_naive"], fraction)))
    print()
    print("Per task, mean AUROC over f < 1 (check / confidence; nan: no wrong answer):")
    for task, models in per_task.items():
        cells = [
            f"{name} {m['monitors']['check']['early']:.2f} / {m['monitors']['confidence']['early']:.2f} "
            f"({m['n_wrong']} wrong)"
            for name, m in models.items()
        ]
        print(f"  {task}: " + "; ".join(cells))
    if args.out:
        Path(args.out).write_text(json.dumps(json_safe(curves), indent=1, allow_nan=False))
        print(f"wrote {args.out}")
    if args.figure:
        plot(curves, Path(args.figure))
        print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
