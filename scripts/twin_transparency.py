"""Variable transparency from the inside: how much of the final answer a linear probe or the logit lens reads
from each model's hidden states before it is written out, per denoising step (diffusion toy) and per token
(autoregressive twin).

    python scripts/twin_transparency.py --model toy-ar          # ~10 min on one CPU thread at --n 100

Both models run the same held-out prompts (n per task, seed 12345). The diffusion toy's residual stream is
harvested into an `ActivationStore` (every step a run took, canvas positions 0-35), the twin's into
`CausalRows` (the state each pass writes its token from, labelled with the answer token d places ahead).
One logistic probe per layer and step (diffusion) or per layer and lookahead d (twin) reads the token the
model finally wrote there, trained and scored on disjoint prompts (`train_probe`, the same 25% held-out
prompts for both models); the logit lens reads the same rows through the final norm and the tied head.

"Not yet written", diffusion: the position's token in the canvas the step reads is not the final one.
Twin: d >= 1 (d = 0 is the token the pass writes). Writes --out (JSON), --figure, and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from diffusionlens import HookedDiffusionGemma, HookedGemma4CausalLM
from diffusionlens.analysis import bootstrap_weights, logit_lens_rows
from diffusionlens.features import ActivationStore, CausalRows, train_probe
from diffusionlens.toy.monitor import fraction_grid, json_safe
from diffusionlens.toy.readout import diffusion_answer_rows, diffusion_readable_share, twin_readable_share
from diffusionlens.toy.tasks import TASKS, make_dataset
from diffusionlens.toy.tokenizer import CHARS, VOCAB

FIGURES = Path(__file__).parents[1] / "docs" / "figures"
LAYER_NAMES = ["block 0 input"] + [f"after block {layer}" for layer in range(6)]
DIGITS = torch.tensor([VOCAB[c] for c in CHARS if c.isdigit()])


def layer_hooks(stack: str, n_layers: int) -> list[str]:
    return [f"{stack}.blocks.0.hook_resid_pre"] + [
        f"{stack}.blocks.{layer}.hook_resid_post" for layer in range(n_layers)
    ]


def verdicts(result, hook: str, group: int, target: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Per store row: 1 / 0 where the probe of (hook, group) was scored (held-out prompts), NaN elsewhere."""
    out = torch.full((n_rows,), float("nan"))
    if (hook, group) in result.predictions:
        rows, predicted = result.predictions[(hook, group)]
        out[rows] = (predicted == target[rows]).float()
    return out


def mean_where(values: torch.Tensor, mask: torch.Tensor) -> float:
    keep = mask & ~torch.isnan(values)
    return float(values[keep].mean()) if keep.any() else float("nan")


def share_summary(share: torch.Tensor, n_boot: int, seed: int = 0) -> dict:
    """Mean over prompts (NaN prompts left out) with a bootstrap interval over prompts, per fraction."""
    keep = ~torch.isnan(share).any(0)
    share = share[:, keep]
    weights = bootstrap_weights(share.shape[1], n_boot, seed).double()
    boot = share @ weights.T / share.shape[1]
    lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.double), dim=1)
    return {"mean": share.mean(1).tolist(), "interval": torch.stack([lo, hi], 1).tolist(), "prompts": int(keep.sum())}


def _fmt(value: float) -> str:
    return "–" if value != value else f"{value:.2f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy-ar", help="the twin: 'toy-ar' (shipped) or a checkpoint directory")
    parser.add_argument("--diffusion", default="toy", help="the diffusion toy: 'toy' or a checkpoint directory")
    parser.add_argument("--n", type=int, default=100, help="held-out prompts per task")
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument(
        "--max-lookahead", type=int, default=34, help="twin tokens ahead to probe (34 covers every answer)"
    )
    parser.add_argument("--table-lookahead", type=int, default=4, help="lookaheads probed at every layer")
    parser.add_argument("--layer", type=int, default=-1, help="layer index into the hook list for the share figure")
    parser.add_argument("--points", type=int, default=20, help="fractions of compute: 1/points, ... 1")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument(
        "--store", default=None, help="directory for the diffusion ActivationStore (default: temporary)"
    )
    parser.add_argument("--out", default=str(FIGURES / "twin_transparency.json"))
    parser.add_argument("--figure", default=str(FIGURES / "twin_transparency.png"), help="'' for none")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    progress = not args.no_progress
    diffusion = HookedDiffusionGemma.from_pretrained(args.diffusion, progress=False)
    twin = HookedGemma4CausalLM.from_pretrained(args.model, progress=False)
    prompts = [p for task in args.tasks for p in make_dataset(task, args.n, seed=args.seed, split="eval").prompts]
    d_hooks = layer_hooks("decoder", diffusion.cfg.num_hidden_layers)
    t_hooks = layer_hooks("causal", twin.cfg.num_hidden_layers)
    figure_hook = args.layer % len(d_hooks)
    start = time.time()

    # ---------------------------------------------------------------- diffusion: rows per step × position
    store = ActivationStore(
        args.store or tempfile.mkdtemp(prefix="twin_transparency_"),
        diffusion,
        d_hooks,
        prompts=prompts,
        seeds=[0],
        positions=list(range(36)),  # the longest answer is 34 characters + eos
        batch_size=20,
    )
    store.harvest(progress=progress)
    d_labels = store.labels()
    answer = diffusion_answer_rows(d_labels)
    d_target = d_labels["final_token"]
    d_probe = train_probe(store, "final_token", rows=answer, keep_predictions=True, progress=progress)
    unwritten = answer & (d_labels["input_token"] != d_target)
    content = answer & torch.isin(d_target, DIGITS)
    draft = logit_lens_rows(diffusion, store.activations(d_hooks[-1]))
    diffusion_out: dict = {"steps": d_probe.steps, "layers": LAYER_NAMES, "hooks": d_hooks, "by_step": {}}
    for step in d_probe.steps:
        at = d_labels["step"] == step
        test = at & torch.isin(d_labels["prompt_id"], torch.tensor(d_probe.test_prompts))
        entry = {
            "answer_rows_held_out": int((answer & test).sum()),
            "unwritten_rows_held_out": int((unwritten & test).sum()),
            "written_share": mean_where((~unwritten).float(), answer & test),
            "draft_is_final": mean_where((draft == d_target).float(), answer & test),
            "probe_all": [],
            "probe_unwritten": [],
            "probe_unwritten_draft_wrong": [],
            "probe_content": [],
            "lens_all": [],
            "lens_unwritten": [],
        }
        draft_wrong = unwritten & test & (draft != d_target)
        entry["draft_wrong_rows_held_out"] = int(draft_wrong.sum())
        for hook in d_hooks:
            probe = verdicts(d_probe, hook, step, d_target, len(d_target))
            lens = (logit_lens_rows(diffusion, store.activations(hook)) == d_target).float()
            entry["probe_all"].append(mean_where(probe, answer & at))
            entry["probe_unwritten"].append(mean_where(probe, unwritten & at))
            entry["probe_unwritten_draft_wrong"].append(mean_where(probe, draft_wrong))
            entry["probe_content"].append(mean_where(probe, content & at))
            entry["lens_all"].append(mean_where(lens, answer & test))
            entry["lens_unwritten"].append(mean_where(lens, unwritten & test))
        diffusion_out["by_step"][str(step)] = entry
    probe_rows = torch.full((len(d_target),), float("nan"))
    for step in d_probe.steps:
        v = verdicts(d_probe, d_hooks[figure_hook], step, d_target, len(d_target))
        probe_rows = torch.where(torch.isnan(v), probe_rows, v)
    test_rows = torch.isin(d_labels["prompt_id"], torch.tensor(d_probe.test_prompts))
    draft_rows = torch.where(test_rows, (draft == d_target).float(), torch.full_like(probe_rows, float("nan")))
    fractions = fraction_grid(args.points)
    diffusion_out["share"] = {
        "probe": share_summary(diffusion_readable_share(d_labels, probe_rows, fractions), args.n_boot),
        "output": share_summary(diffusion_readable_share(d_labels, draft_rows, fractions), args.n_boot),
    }

    # ---------------------------------------------------------------- twin: rows per pass × lookahead
    rows = CausalRows(twin, t_hooks, prompts=prompts, max_lookahead=args.max_lookahead)
    rows.harvest(progress=progress)
    t_labels = rows.labels()
    t_target = t_labels["final_token"]
    table_d = list(range(min(args.table_lookahead, args.max_lookahead) + 1))
    t_probe = train_probe(rows, "final_token", by="lookahead", steps=table_d, keep_predictions=True, progress=progress)
    assert t_probe.test_prompts == d_probe.test_prompts  # same prompts, same split
    t_test = torch.isin(t_labels["prompt_id"], torch.tensor(t_probe.test_prompts))
    content_t = torch.isin(t_target, DIGITS)
    twin_out: dict = {"lookaheads": table_d, "layers": LAYER_NAMES, "hooks": t_hooks, "by_lookahead": {}}
    for d in table_d:
        at = t_labels["lookahead"] == d
        entry = {
            "rows_held_out": int((at & t_test).sum()),
            "majority_baseline": float(t_probe.baseline[table_d.index(d)]),
            "probe": t_probe.score[:, table_d.index(d)].tolist(),
            "probe_content": [],
            "lens": [],
        }
        for hook in t_hooks:
            probe = verdicts(t_probe, hook, d, t_target, len(t_target))
            entry["probe_content"].append(mean_where(probe, content_t & at))
            lens = (logit_lens_rows(twin, rows.activations(hook), stack="causal") == t_target).float()
            entry["lens"].append(mean_where(lens, at & t_test))
        twin_out["by_lookahead"][str(d)] = entry
    all_d = sorted(set(t_labels["lookahead"].tolist()))
    far = train_probe(
        rows, "final_token", by="lookahead", hooks=[t_hooks[figure_hook]], keep_predictions=True, progress=progress
    )
    twin_out["figure_layer_by_lookahead"] = {
        "lookahead": far.steps,
        "probe": far.score[0].tolist(),
        "majority_baseline": far.baseline.tolist(),
        "rows_held_out": far.n_test.tolist(),
    }
    probe_rows_t = torch.full((len(t_target),), float("nan"))
    for d in all_d:
        v = verdicts(far, t_hooks[figure_hook], d, t_target, len(t_target))
        probe_rows_t = torch.where(torch.isnan(v), probe_rows_t, v)
    # lookaheads too rare to score (fewer than 10 held-out rows) count as unread
    probe_rows_t = torch.where(t_test & torch.isnan(probe_rows_t), torch.zeros_like(probe_rows_t), probe_rows_t)
    own = torch.where(t_labels["lookahead"] == 0, 1.0, 0.0)  # the token a pass writes is its own output
    output_rows_t = torch.where(t_test, own, torch.full_like(own, float("nan")))
    twin_out["share"] = {
        "probe": share_summary(twin_readable_share(t_labels, probe_rows_t, fractions), args.n_boot),
        "output": share_summary(twin_readable_share(t_labels, output_rows_t, fractions), args.n_boot),
    }
    seconds = time.time() - start

    result = {
        "settings": {
            "model": str(args.model),
            "diffusion": str(args.diffusion),
            "n_per_task": args.n,
            "seed": args.seed,
            "tasks": args.tasks,
            "held_out_prompts": len(d_probe.test_prompts),
            "figure_layer": LAYER_NAMES[figure_hook],
            "max_lookahead": args.max_lookahead,
            "seconds": round(seconds, 1),
        },
        "fractions": fractions,
        "diffusion": diffusion_out,
        "twin": twin_out,
    }
    print(
        f"twin {args.model}, diffusion {args.diffusion}; {len(prompts)} prompts, {len(d_probe.test_prompts)} held out"
    )
    print(report(result))
    if args.out:
        Path(args.out).write_text(json.dumps(json_safe(result), indent=1, allow_nan=False))
        print(f"wrote {args.out}")
    if args.figure:
        plot(result, Path(args.figure))
        print(f"wrote {args.figure}")


def report(result: dict) -> str:
    diff, twin = result["diffusion"], result["twin"]
    steps = diff["steps"]
    lines = [
        "Diffusion toy: final token read at answer positions not yet written in the canvas the step reads",
        "(probe / logit lens; held-out prompts):",
        "",
    ]
    lines.append("| layer | " + " | ".join(f"step {s}" for s in steps) + " |")
    lines.append("|---" * (len(steps) + 1) + "|")
    for i, name in enumerate(diff["layers"]):
        by_step = [diff["by_step"][str(s)] for s in steps]
        cells = [f"{_fmt(e['probe_unwritten'][i])} / {_fmt(e['lens_unwritten'][i])}" for e in by_step]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for key, label in (
        ("written_share", "answer tokens already in the canvas"),
        ("draft_is_final", "step's draft = final token"),
        ("unwritten_rows_held_out", "held-out unwritten rows"),
        ("draft_wrong_rows_held_out", "… of which the draft is wrong"),
    ):
        lines.append(
            f"| {label} | "
            + " | ".join(
                _fmt(diff["by_step"][str(s)][key])
                if isinstance(diff["by_step"][str(s)][key], float)
                else str(diff["by_step"][str(s)][key])
                for s in steps
            )
            + " |"
        )
    name = result["settings"]["figure_layer"]
    lines.append(
        "| probe "
        + name
        + ", where the draft is wrong | "
        + " | ".join(_fmt(diff["by_step"][str(s)]["probe_unwritten_draft_wrong"][-1]) for s in steps)
        + " |"
    )
    ds = twin["lookaheads"]
    lines += [
        "",
        "Twin: answer token d places ahead of the one a pass writes (d = 0: its own token), read from that",
        "pass's state at the last position (probe / logit lens; the lens reads the next token, so only d = 0):",
        "",
    ]
    lines.append("| layer | " + " | ".join(f"d = {d}" for d in ds) + " |")
    lines.append("|---" * (len(ds) + 1) + "|")
    for i, layer in enumerate(twin["layers"]):
        cells = []
        for d in ds:
            e = twin["by_lookahead"][str(d)]
            cells.append(f"{_fmt(e['probe'][i])} / {_fmt(e['lens'][i])}" if d == 0 else _fmt(e["probe"][i]))
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    lines.append(
        "| digits only ("
        + twin["layers"][-1]
        + ") | "
        + " | ".join(_fmt(twin["by_lookahead"][str(d)]["probe_content"][-1]) for d in ds)
        + " |"
    )
    lines.append(
        "| majority baseline | "
        + " | ".join(_fmt(twin["by_lookahead"][str(d)]["majority_baseline"]) for d in ds)
        + " |"
    )
    lines.append(
        "| held-out rows | " + " | ".join(str(twin["by_lookahead"][str(d)]["rows_held_out"]) for d in ds) + " |"
    )
    fr = result["fractions"]
    cols = [fr.index(f) for f in (0.25, 0.5, 0.75, 0.9, 1.0) if f in fr]
    lines += [
        "",
        f"Share of the final answer read ({name} probe; output = what the model has written or drafts), "
        "after a fraction f of each run's compute, mean [95% interval] over held-out prompts:",
        "",
    ]
    lines.append("| model | reader | " + " | ".join(f"f = {fr[c]:g}" for c in cols) + " |")
    lines.append("|---" * (len(cols) + 2) + "|")
    for model, data in (("diffusion", diff), ("twin", twin)):
        for reader in ("output", "probe"):
            s = data["share"][reader]
            lines.append(
                f"| {model} | {reader} | "
                + " | ".join(f"{s['mean'][c]:.2f} [{s['interval'][c][0]:.2f}, {s['interval'][c][1]:.2f}]" for c in cols)
                + " |"
            )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    diff, twin = result["diffusion"], result["twin"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.3))
    x = range(len(diff["layers"]))
    ax = axes[0]
    for i, step in enumerate(diff["steps"]):
        e = diff["by_step"][str(step)]
        if e["unwritten_rows_held_out"] < 20:  # too few positions left to write to draw a curve
            continue
        ax.plot(x, e["probe_unwritten"], marker="o", color=f"C{i}", label=f"step {step} probe")
        ax.plot(x, e["lens_unwritten"], ls="--", color=f"C{i}", label=f"step {step} lens")
    ax.set_title("diffusion toy: final token at positions not yet in the canvas", fontsize=9)
    ax = axes[1]
    for d in twin["lookaheads"]:
        e = twin["by_lookahead"][str(d)]
        ax.plot(x, e["probe"], marker="o", color=f"C{d}", label=f"d = {d} probe")
        if d == 0:
            ax.plot(x, e["lens"], ls="--", color="C0", label="d = 0 lens")
    ax.set_title("twin: answer token d ahead of the one the pass writes", fontsize=9)
    for ax in axes[:2]:
        ax.set_xticks(list(x), diff["layers"], rotation=30, fontsize=7)
        ax.set(ylabel="accuracy (held-out prompts)", ylim=(-0.02, 1.02))
        ax.legend(fontsize=6, ncol=2)
    ax = axes[2]
    fr = result["fractions"]
    for model, data, colour in (("diffusion", diff, "C0"), ("twin", twin, "C3")):
        for reader, style in (("output", "--"), ("probe", "-")):
            s = data["share"][reader]
            lo, hi = zip(*s["interval"], strict=True)
            ax.step(fr, s["mean"], where="post", ls=style, color=colour, label=f"{model}: {reader}")
            ax.fill_between(fr, lo, hi, step="post", alpha=0.15, color=colour)
    ax.set(xlabel="fraction of the run's compute spent", ylabel="share of the final answer read", ylim=(-0.02, 1.02))
    ax.set_title(f"final answer readable ({result['settings']['figure_layer']} probe)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
