"""Training curves of the autoregressive twin, for its model card in docs/ar_twin.md.

    python scripts/ar_twin_card.py --run runs/toy-ar          # thins the run's log into docs/figures/
    python scripts/ar_twin_card.py                            # redraws from the committed thinned log

Writes `docs/figures/ar_twin_training_log.json` (mean loss per window of steps, learning rate, wall-clock
seconds, and the quick held-out evaluations logged during training) and `docs/figures/ar_twin_curves.png`,
and prints the curve as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

FIGURES = Path(__file__).parents[1] / "docs" / "figures"
THIN_LOG = FIGURES / "ar_twin_training_log.json"


def thin(log: list[dict], window: int) -> list[dict]:
    """Mean loss over each `window` steps; the evaluations logged in that window are kept as they are."""
    rows = []
    for start in range(0, len(log), window):
        chunk = log[start : start + window]
        row = {
            "step": chunk[-1]["step"],
            "loss": round(statistics.mean(e["loss"] for e in chunk), 4),
            "lr": chunk[-1].get("lr"),
            "seconds": round(chunk[-1]["seconds"], 1),
        }
        evals = [e["eval"] for e in chunk if "eval" in e]
        if evals:
            row["eval"] = evals[-1]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a train_ar output directory (its training_state.json)")
    parser.add_argument("--window", type=int, default=100)
    args = parser.parse_args(argv)
    if args.run:
        log = json.loads((Path(args.run) / "training_state.json").read_text())["log"]
        THIN_LOG.write_text(json.dumps(thin(log, args.window), indent=1))
    rows = json.loads(THIN_LOG.read_text())

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax_loss.set(xlabel="step", ylabel=f"answer-token loss (mean of {args.window} steps)", yscale="log")
    evaluated = [r for r in rows if "eval" in r]
    for task in evaluated[0]["eval"] if evaluated else []:
        ax_eval.plot([r["step"] for r in evaluated], [100 * r["eval"][task] for r in evaluated], marker="o", label=task)
    ax_eval.set(xlabel="step", ylabel="exact match, quick eval (%)", ylim=(0, 100))
    ax_eval.legend()
    fig.suptitle("toy-ar training (1 CPU thread)")
    fig.tight_layout()
    fig.savefig(FIGURES / "ar_twin_curves.png", dpi=110)

    print("| step | minutes | loss | lr | quick eval (exact match) |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "eval" in r or r is rows[-1]:
            evals = ", ".join(f"{k} {100 * v:.0f}%" for k, v in r.get("eval", {}).items())
            print(f"| {r['step']} | {r['seconds'] / 60:.1f} | {r['loss']:.3f} | {r['lr']:.2e} | {evals} |")


if __name__ == "__main__":
    main()
