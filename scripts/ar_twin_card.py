"""Training curves of the autoregressive twin, for its model card in docs/ar_twin.md.

    python scripts/ar_twin_card.py --run runs/stage1 --run runs/stage2   # thin the stages' logs, in order
    python scripts/ar_twin_card.py                                                  # redraw from the committed log

Each `--run` is one `train_ar` output directory (its `training_state.json`), in training order; a later
stage starts from the earlier one's weights (`--init-from`). Writes `docs/figures/ar_twin_training_log.json`
(per stage: its settings, and the mean loss per window of steps, learning rate, wall-clock seconds and
the quick held-out evaluations logged during training) and `docs/figures/ar_twin_curves.png` (against
training examples seen, since stages differ in batch size), and prints the curve as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

FIGURES = Path(__file__).parents[1] / "docs" / "figures"
THIN_LOG = FIGURES / "ar_twin_training_log.json"
SETTINGS_SHOWN = ("batch_size", "lr", "min_lr", "warmup", "max_seconds", "device", "init_from", "init_step")


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


def read_stage(run: Path, window: int) -> dict:
    state = json.loads((run / "training_state.json").read_text())
    settings = {k: state["settings"][k] for k in SETTINGS_SHOWN if k in state["settings"]}
    return {"run": run.name, "settings": settings, "rows": thin(state["log"], window)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", default=[], help="a train_ar output directory; repeat per stage")
    parser.add_argument("--window", type=int, default=100)
    args = parser.parse_args(argv)
    if args.run:
        THIN_LOG.write_text(json.dumps([read_stage(Path(r), args.window) for r in args.run], indent=1))
    stages = json.loads(THIN_LOG.read_text())

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(10, 3.6))
    seen = 0  # training examples before the current stage
    tasks = sorted({t for s in stages for r in s["rows"] for t in r.get("eval", {})})
    lines = [
        "| stage | step | examples seen | minutes | loss | lr | quick eval (exact match) |",
        "|---|---|---|---|---|---|---|",
    ]
    for number, stage in enumerate(stages, start=1):
        batch, rows = stage["settings"]["batch_size"], stage["rows"]
        x = [seen + r["step"] * batch for r in rows]
        ax_loss.plot(x, [r["loss"] for r in rows], color="C0")
        evaluated = [(xi, r) for xi, r in zip(x, rows, strict=True) if "eval" in r]
        for i, task in enumerate(tasks):
            ax_eval.plot(
                [xi for xi, _ in evaluated],
                [100 * r["eval"][task] for _, r in evaluated],
                marker="o",
                color=f"C{i}",
                label=task if number == 1 else None,
            )
        for r, xi in zip(rows, x, strict=True):
            if "eval" in r or r is rows[-1]:
                evals = ", ".join(f"{k} {100 * v:.0f}%" for k, v in r.get("eval", {}).items())
                lines.append(
                    f"| {number} ({stage['settings'].get('device', 'cpu')}) | {r['step']} | {xi:,} | "
                    f"{r['seconds'] / 60:.1f} | {r['loss']:.3f} | {r['lr']:.2e} | {evals} |"
                )
        seen = x[-1]
        for ax in (ax_loss, ax_eval):
            ax.axvline(seen, color="grey", linewidth=0.5)
    ax_loss.set(
        xlabel="training examples seen", ylabel=f"answer-token loss (mean of {args.window} steps)", yscale="log"
    )
    ax_eval.set(xlabel="training examples seen", ylabel="exact match, quick eval (%)", ylim=(0, 100))
    ax_eval.legend()
    fig.suptitle("toy-ar training (stages separated by grey lines)")
    fig.tight_layout()
    fig.savefig(FIGURES / "ar_twin_curves.png", dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
