"""Train a tuned lens for a model, pick its kind on held-out prompts, and measure every reader.

    python -m diffusionlens.lens.train_tuned --model toy --out diffusionlens/lens/shipped/toy_tuned_lens.safetensors \
        --report docs/figures/reading_latents

One command, seeded, regenerates everything the "Reading latents" page reports:

1. prompts of the toy's tasks: lens training and validation prompts from the train split (disjoint), test
   prompts from the held-out eval split (`diffusionlens.toy.tasks.is_held_out`);
2. residuals of every layer at every step of the model's own runs on them (`harvest_residuals`);
3. a tuned lens of each kind ("step_embedding", "step_buckets"), the one with the lower validation KL kept
   and saved to `--out`;
4. KL to the model's output by (layer, step) on the test prompts, logit lens against both tuned lenses;
5. unless `--skip-scope`: reading accuracy by (layer, step) of the logit lens, the tuned lens, linear probes
   (trained on the lens-training runs) and canvas-scope (both routes) with its control, on the test runs'
   digits before they are in the canvas.

`--report` receives `reading_latents.json`, markdown tables and (with matplotlib) two PNG figures.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from diffusionlens.lens.fit import kl_table, logit_lens_reader, reader_kl, target_log_probs, translated_reader
from diffusionlens.lens.harvest import StepResiduals, harvest_residuals
from diffusionlens.lens.reading import ReadingTable, compare_readers
from diffusionlens.lens.translators import KINDS
from diffusionlens.lens.tuned import TunedLens
from diffusionlens.toy.tasks import make_dataset

if TYPE_CHECKING:
    from diffusionlens.model import HookedDiffusionGemma


def toy_prompt_splits(n_train: int, n_val: int, n_test: int, seed: int) -> dict[str, list[str]]:
    """Training, validation (both from the toy's train split, disjoint) and test prompts (its held-out split)."""
    train = make_dataset(None, n_train, 1000 + seed, split="train", unique=True).prompts
    val = make_dataset(None, n_val, 2000 + seed, split="train", unique=True, exclude=set(train)).prompts
    test = make_dataset(None, n_test, 3000 + seed, split="eval", unique=True).prompts
    return {"train": train, "val": val, "test": test}


def kl_tables(
    model, data: StepResiduals, lenses: dict[str, TunedLens], selections: dict[str, torch.Tensor]
) -> dict[str, dict[str, dict]]:
    """Per selection of rows (name -> mask), the `LensKL` dicts of the logit lens and each lens."""
    target = target_log_probs(model, data)
    readers = {"logit lens": logit_lens_reader(model)}
    readers.update(
        {f"tuned lens ({kind})": translated_reader(model, lens.translators) for kind, lens in lenses.items()}
    )
    per_row = {name: reader_kl(model, data, reader, target) for name, reader in readers.items()}
    return {
        selection: {name: kl_table(kl, data, rows).to_dict() for name, kl in per_row.items()}
        for selection, rows in selections.items()
    }


def kl_markdown(tables: dict[str, dict], chosen: str) -> str:
    """Rows: layers; columns: steps; cells: logit lens / tuned lens (`chosen`) KL, in nats."""
    logit, tuned = tables["logit lens"], tables[chosen]
    steps = logit["steps"]
    lines = [
        "| layer | " + " | ".join(f"step {s} (n={n})" for s, n in zip(steps, logit["counts"], strict=True)) + " |",
        "|---|" + "---|" * len(steps),
    ]
    for layer in logit["layers"]:
        cells = [f"{logit['values'][layer][i]:.3f} / {tuned['values'][layer][i]:.3f}" for i in range(len(steps))]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reading_markdown(table: ReadingTable) -> str:
    """Rows: (reader, layer); columns: steps, then all rows pooled."""
    header = " | ".join(f"step {s} (n={n})" for s, n in zip(table.steps, table.counts.tolist(), strict=True))
    lines = [f"| reader | layer | {header} | pooled |", "|---|---|" + "---|" * (len(table.steps) + 1)]
    for name in table.readers:
        pooled = table.pooled(name)
        layers = [0] if name == "target alone" else range(table.accuracy[name].shape[0])
        for layer in layers:
            cells = [f"{100 * v:.0f}%" for v in table.accuracy[name][layer].tolist()]
            lines.append(
                f"| {name} | {'-' if name == 'target alone' else layer} | "
                + " | ".join(cells)
                + f" | {100 * pooled[layer]:.0f}% |"
            )
    return "\n".join(lines)


def digit_tokens(model) -> list[int] | None:
    """The ids of the single-character digits, if the tokenizer has them (the toy's answers to read)."""
    tokenizer = model.tokenizer
    if tokenizer is None:
        return None
    ids = tokenizer.convert_tokens_to_ids([str(d) for d in range(10)])
    return None if any(i is None or i == tokenizer.unk_token_id for i in ids) else list(ids)


def run(args: argparse.Namespace) -> dict[str, Any]:
    random.seed(args.seed)
    model = start_experiment(args)
    progress = not args.no_progress
    prompts = toy_prompt_splits(args.train_prompts, args.val_prompts, args.test_prompts, args.seed)
    data = {split: harvest_residuals(model, p, progress=progress) for split, p in prompts.items()}
    lenses = {
        kind: TunedLens.from_residuals(
            model, data["train"], kind=kind, epochs=args.epochs, seed=args.seed, progress=progress
        )
        for kind in KINDS
    }
    val = kl_tables(model, data["val"], lenses, {"answer": data["val"].in_answer})["answer"]
    upto = model.cfg.num_hidden_layers - 1  # the last layer is the model's output: every reader's KL is 0 there
    val_means = {kind: sum(map(float, _pooled(val[f"tuned lens ({kind})"])[:upto])) / upto for kind in KINDS}
    chosen = min(val_means, key=val_means.get)
    lens = lenses[chosen]
    everywhere = torch.ones(len(data["test"]), dtype=torch.bool)
    test = kl_tables(model, data["test"], lenses, {"answer": data["test"].in_answer, "all": everywhere})
    test_answer, test_all = test["answer"], test["all"]
    lens.metadata.update(
        {"model": args.model, "validation_kl": val_means, "prompts": {k: len(v) for k, v in prompts.items()}}
    )
    lens.save(args.out)
    report: dict[str, Any] = {
        "command": args.command_line,
        "chosen_kind": chosen,
        "validation_mean_kl_layers_below_last": val_means,
        "test_kl_answer_positions": test_answer,
        "test_kl_all_positions": test_all,
    }
    if args.report:  # the lens tables first: canvas-scope takes longer
        write_report(Path(args.report), report, chosen, None)
    print(f"kept {chosen}; validation KL {val_means}", flush=True)
    reading = None
    if not args.skip_scope:
        reading = compare_readers(
            model,
            data["test"],
            lens=lens,
            probe_data=data["train"],
            read_tokens=digit_tokens(model),
            max_rows_per_step=args.max_rows_per_step,
            seed=args.seed,
            progress=progress,
        )
        report["reading_accuracy"] = reading.to_dict()
    if args.report and reading is not None:
        write_report(Path(args.report), report, chosen, reading)
    return report


def _pooled(table: dict) -> list[float]:
    total = sum(table["counts"])
    return [sum(v * n for v, n in zip(row, table["counts"], strict=True)) / total for row in table["values"]]


def write_report(directory: Path, report: dict[str, Any], chosen: str, reading: ReadingTable | None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "reading_latents.json").write_text(json.dumps(report, indent=1) + "\n")
    name = f"tuned lens ({chosen})"
    text = [
        f"KL to the model's output (nats), logit lens / {name}, answer positions of the test prompts:\n",
        kl_markdown(report["test_kl_answer_positions"], name),
        "\nAll canvas positions:\n",
        kl_markdown(report["test_kl_all_positions"], name),
        "\nValidation mean KL over layers below the last: "
        + ", ".join(f"{k} {v:.4f}" for k, v in report["validation_mean_kl_layers_below_last"].items()),
    ]
    (directory / "lens_kl.md").write_text("\n".join(text) + "\n")
    if reading is not None:
        (directory / "reading_accuracy.md").write_text(reading_markdown(reading) + "\n")
    try:
        from diffusionlens.viz.reading import plot_lens_kl, plot_reading_accuracy

        plot_lens_kl(
            report["test_kl_answer_positions"], directory / "lens_kl.png", "KL to the model's output, answer positions"
        )
        if reading is not None:
            plot_reading_accuracy(
                reading.to_dict(), directory / "reading_accuracy.png", "final digit read before it is in the canvas"
            )
    except ImportError as err:  # matplotlib is the [viz] extra
        print(f"figures skipped: {err}")


def main(argv: list[str] | None = None) -> None:
    parser = experiment_parser("python -m diffusionlens.lens.train_tuned", __doc__)
    parser.add_argument("--out", required=True, help="the lens file to write (.safetensors)")
    parser.add_argument("--report", default=None, help="a directory for the tables, JSON and figures")
    parser.add_argument("--val-prompts", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--skip-scope", action="store_true", help="measure the lenses only, not canvas-scope")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    run(parse_experiment_args(parser, argv))


def experiment_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """The command line both reading-latents experiments share (this one and `lens.oracle`): the model, the
    prompt counts, reading rows per step, the seed and torch's threads."""
    parser = argparse.ArgumentParser(prog=prog, description=(doc or "").split("\n")[0])
    parser.add_argument("--model", default="toy", help="a checkpoint directory or 'toy'")
    parser.add_argument("--train-prompts", type=int, default=600)
    parser.add_argument("--test-prompts", type=int, default=128)
    parser.add_argument("--max-rows-per-step", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (0: torch's default; one is fastest on a shared CPU)"
    )
    return parser


def parse_experiment_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The parsed arguments, with `command_line`: the command as typed, for the report."""
    args = parser.parse_args(argv)
    args.command_line = f"{parser.prog} " + " ".join(argv if argv is not None else sys.argv[1:])
    return args


def start_experiment(args: argparse.Namespace) -> HookedDiffusionGemma:
    """Seed torch, set its threads and load `args.model`: what both experiments do first."""
    from diffusionlens.model import HookedDiffusionGemma

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    return HookedDiffusionGemma.from_pretrained(args.model, progress=False)


if __name__ == "__main__":
    main()
