"""Time an attribution graph of the toy's squares trajectory (every canvas position, every step) on this CPU.

    /work/main/.venv/bin/python benchmarks/attribution_graph.py --threads 2
    /work/main/.venv/bin/python benchmarks/attribution_graph.py --entropy-bound 0 --t-min 1 --t-max 1.5 --max-steps 8

Random transcoders (`random_transcoders(model, width)`): the cost of attribution does not depend on what the
features mean, only on how many are active and how many become rows. With the default sampler the toy
finishes the squares canvas in 2 steps; hotter settings (second line) make a trajectory of every step
allowed. Prints the machine, the trajectory,
the time of each phase (record, sweep, scores, JSON), the graph's size and the process's peak memory.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch

from diffusionlens import HookedDiffusionGemma, ReplayNoise
from diffusionlens.graphs.attribution import attribute_trajectory
from diffusionlens.graphs.trajectory import record_trajectory
from diffusionlens.graphs.transcoders import random_transcoders
from diffusionlens.toy import EXAMPLE_PROMPTS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--max-feature-nodes", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--entropy-bound", type=float, default=None, help="default: the sampler's (0.1)")
    parser.add_argument("--max-steps", type=int, default=48)
    parser.add_argument("--t-min", type=float, default=None, help="default: the sampler's (0.4)")
    parser.add_argument("--t-max", type=float, default=None, help="default: the sampler's (0.8)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, ")
    print(f"threads {args.threads}, load average {os.getloadavg()}")
    model = HookedDiffusionGemma.from_pretrained("toy")
    transcoders = random_transcoders(model, args.width, seed=0)
    input_ids = model.to_tokens(EXAMPLE_PROMPTS["squares"])
    options = dict(max_new_tokens=model.cfg.canvas_length, max_denoising_steps=args.max_steps)
    for name in ("entropy_bound", "t_min", "t_max"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)

    start = time.perf_counter()
    trajectory = record_trajectory(model, input_ids, noise=ReplayNoise(args.seed), **options)
    recorded = time.perf_counter()
    final = trajectory.steps[-1]
    target = dict(position=0, step=-1, token=int(final.logits[0].argmax()))
    graph = attribute_trajectory(model, transcoders, trajectory, target, max_feature_nodes=args.max_feature_nodes)
    swept = time.perf_counter()
    scores = graph.replacement_score, graph.completeness_score
    scored = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        graph.to_json(Path(tmp) / "graph.json")
    written = time.perf_counter()

    active = sum(int((a > 0).sum()) for step in _acts(trajectory, transcoders) for a in step)
    kinds = {k: graph.kind.count(k) for k in ("feature", "error", "token", "prompt", "logit")}
    print(f"trajectory: {trajectory.n_steps} steps x {model.cfg.canvas_length} positions, {active} active features")
    print(f"graph: nodes {kinds}, edges {graph.adjacency._nnz()}")
    print(f"replacement score {scores[0]:.3f}, completeness {scores[1]:.3f}")
    print(
        f"time: record {recorded - start:.1f} s, sweep {swept - recorded:.1f} s, scores {scored - swept:.1f} s, "
        f"json {written - scored:.1f} s; total {written - start:.1f} s"
    )
    print(f"peak resident memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


def _acts(trajectory, transcoders):
    from diffusionlens.graphs.replacement import recorded_sources

    return recorded_sources(trajectory, transcoders).acts


if __name__ == "__main__":
    main()
