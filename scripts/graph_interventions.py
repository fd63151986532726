"""Check the toy's attribution graphs against the real model by intervention (#35 item 5).

    /work/main/.venv/bin/python scripts/graph_interventions.py --threads 2
    /work/main/.venv/bin/python scripts/graph_interventions.py --tasks addition --seeds 0 --top-n 5 --verbose

For each task prompt and noise seed: record the toy's trajectory (default sampler), and take as target the
logit difference, at a chosen answer position, between the run's final answer token and the runner-up at
the target step. Three checks per trajectory: the target at step 0 (features of step 0), at the last step
(any step's features: in practice that step's own), and at the last step with only step-0 features (the
effects that cross a step, through self-conditioning). Each check builds the graph with the shipped toy
transcoders, ablates (and steers ×2) its top features by influence on the real model (the transcoder spliced
with its error term at that step and layer only, canvases held at the recorded ones), ablates as many random
active features at the same steps, and compares (`diffusionlens.graphs.validate.check_graph`). Prints one
line per check and the correlations pooled over each kind of check.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from diffusionlens import HookedDiffusionGemma, ReplayNoise
from diffusionlens.graphs.attribution import attribute_trajectory
from diffusionlens.graphs.trajectory import record_trajectory
from diffusionlens.graphs.transcoders import load_transcoders
from diffusionlens.graphs.validate import check_graph, pearson, spearman
from diffusionlens.toy import EXAMPLE_PROMPTS

#: The answer position checked per task: squares' count digit, addition's last digit.
POSITIONS = {"squares": 0, "addition": 2}


def target_at(trajectory, step: int, position: int) -> dict:
    """The final answer token at `position` against the runner-up among `step`'s logits there."""
    answer = int(trajectory.steps[-1].logits[position].argmax())
    logits = trajectory.steps[step].pre_logits[position].clone()
    logits[answer] = -math.inf
    return dict(position=position, step=step, token=(answer, int(logits.argmax())))


def checks_of(n_steps: int) -> list[tuple[str, int, list[int] | None]]:
    last = n_steps - 1
    checks = [("step 0", 0, None)]
    if last > 0:
        checks += [(f"step {last}", last, None), (f"step {last} <- step 0", last, [0])]
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(POSITIONS), choices=list(POSITIONS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--top-n", type=int, default=10)
    parser.add_argument("--max-feature-nodes", type=int, default=4096)
    parser.add_argument(
        "--min-influence",
        type=float,
        default=1e-3,
        help="features below this influence are not rows (the budget alone is spent on the target's own step)",
    )
    parser.add_argument("--steer", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--verbose", action="store_true", help="print each check's per-feature table")
    parser.add_argument("--json", default=None, help="write every check's nodes and summary to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = HookedDiffusionGemma.from_pretrained("toy")
    transcoders = load_transcoders("toy", model=model)
    pooled: dict[str, list] = {"within step": [], "across steps": []}
    records = []
    print(
        f"{'task':9} {'seed':>4} {'check':18} {'answer':>6} {'target':>7} {'r total':>7} {'rho':>6} "
        f"{'r dir':>6} {'sign':>5} {'slope':>6} {'r steer':>7} {'|top|':>7} {'|random|':>8}"
    )
    for task in args.tasks:
        input_ids = model.to_tokens(EXAMPLE_PROMPTS[task])
        for seed in args.seeds:
            options = dict(noise=ReplayNoise(seed), max_new_tokens=model.cfg.canvas_length)
            trajectory = record_trajectory(model, input_ids, **options)
            graphs = {}
            for name, step, steps in checks_of(trajectory.n_steps):
                target = target_at(trajectory, step, POSITIONS[task])
                if step not in graphs:
                    graphs[step] = attribute_trajectory(
                        model,
                        transcoders,
                        trajectory,
                        target,
                        max_feature_nodes=args.max_feature_nodes,
                        min_influence=args.min_influence,
                    )
                result = check_graph(
                    model,
                    transcoders,
                    input_ids,
                    trajectory,
                    graphs[step],
                    top_n=args.top_n,
                    steps=steps,
                    steer=args.steer,
                    seed=seed,
                    **options,
                )
                s = result.summary
                answer = model.to_string([target["token"][0]])
                print(
                    f"{task:9} {seed:4d} {name:18} {answer!r:>6} {s['target_value']:7.3f} {s['pearson_total']:7.3f} "
                    f"{s['spearman_total']:6.3f} {s['pearson_direct']:6.3f} {s['sign_agreement']:5.2f} "
                    f"{s['slope_total']:6.3f} {s['pearson_steer']:7.3f} {s['mean_abs_measured_top']:7.4f} "
                    f"{s['mean_abs_measured_random']:8.5f}"
                )
                if args.verbose:
                    print(result.table())
                pooled["across steps" if steps == [0] else "within step"].append(result)
                records.append(
                    {
                        "task": task,
                        "seed": seed,
                        "check": name,
                        "summary": s,
                        "nodes": [vars(n) for n in result.nodes],
                        "random": [vars(n) for n in result.random],
                    }
                )
    print()
    for kind, results in pooled.items():
        if not results:
            continue
        nodes = [n for r in results for n in r.nodes]
        random = [n for r in results for n in r.random]
        predicted = torch.tensor([n.predicted for n in nodes], dtype=torch.float64)
        measured = torch.tensor([n.measured for n in nodes], dtype=torch.float64)
        direct = torch.tensor([-n.direct for n in nodes], dtype=torch.float64)
        steer_p = torch.tensor([n.steer_predicted for n in nodes], dtype=torch.float64)
        steer_m = torch.tensor([n.steer_measured for n in nodes], dtype=torch.float64)
        replacement = torch.tensor([n.replacement for n in nodes], dtype=torch.float64)
        top_abs = measured.abs().mean()
        random_abs = torch.tensor([abs(n.measured) for n in random], dtype=torch.float64).mean()
        print(
            f"pooled, {kind} ({len(results)} checks, {len(nodes)} features): ablation vs -total effect "
            f"Pearson {pearson(predicted, measured):.3f}, Spearman {spearman(predicted, measured):.3f}; "
            f"vs -direct effect Pearson {pearson(direct, measured):.3f}, Spearman {spearman(direct, measured):.3f}; "
            f"slope {float(predicted @ measured / (predicted @ predicted)):.3f}; "
            f"steer x{args.steer:g} Pearson {pearson(steer_p, steer_m):.3f}; "
            f"replacement model (JumpReLU) vs predicted Pearson {pearson(predicted, replacement):.3f}, "
            f"vs real {pearson(replacement, measured):.3f}; "
            f"mean |change| top {float(top_abs):.4f} vs random {float(random_abs):.5f} ({len(random)} random)"
        )
    print(f"\n{time.perf_counter() - start:.0f} s on {args.threads} threads")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(records, handle, indent=1, default=float)


if __name__ == "__main__":
    main()
