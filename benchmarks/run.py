"""Benchmark diffusionlens' HookedDiffusionGemma against transformers' DiffusionGemma.

Both libraries hold the same weights in one process; every case interleaves their runs, repeats
them after a warm-up and reports medians and ratios (ours / transformers unless the case says
otherwise). See benchmarks/README.md.

    python benchmarks/run.py --quick                      # smoke run, toy + 200m, a minute or two
    python benchmarks/run.py --models 200m --repeats 7    # the fuller run
    python benchmarks/run.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `benchmarks.*` when run as a script

from benchmarks import cases  # noqa: E402
from benchmarks.memory import sharded_load_rows  # noqa: E402
from benchmarks.models import build_pair  # noqa: E402
from benchmarks.sweeps import sweeps  # noqa: E402
from benchmarks.timing import Timer, machine_description  # noqa: E402

CASES = ("decoder", "hooks", "generate", "memory", "patching", "sweeps")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="toy,200m,55m", help="comma-separated: toy, 200m, 55m")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and steps: a smoke run")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per contender (default 7, quick 3)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/<machine>.json)")
    return parser.parse_args(argv)


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "B":
        return f"{value / 2**20:.2f} MiB"
    return f"{value * 1e3:.2f} ms" if value < 1 else f"{value:.3f} s"


def table(rows: list[dict]) -> str:
    header = ["model", "case", "ours", "reference", "ratio", "target", "met", "note"]
    lines = [
        [
            r["model"],
            r["case"],
            fmt(r["ours"], r["unit"]),
            fmt(r["reference"], r["unit"]),
            "-" if r["ratio"] is None else f"{r['ratio']:.3f}",
            "-" if r["target"] is None else f"<= {r['target']:.2f}",
            {True: "met", False: "MISSED", None: "-"}[r["met"]],
            r["note"],
        ]
        for r in rows
    ]
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    dtype = getattr(torch, args.dtype)
    repeats = args.repeats or (3 if args.quick else 7)
    timer = Timer(args.device, warmup=args.warmup, repeats=repeats)
    chosen = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(chosen) - set(CASES))
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    machine = machine_description(args.device, dtype, threads)
    print("machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()))
    print(f"repeats={repeats} warmup={args.warmup} quick={args.quick} models={args.models} cases={','.join(chosen)}")
    rows: list[dict] = []
    started = time.perf_counter()
    torch.set_grad_enabled(False)
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        t0 = time.perf_counter()
        pair = build_pair(name, dtype=dtype, device=args.device, quick=args.quick)
        print(
            f"\n== {name}: {pair.n_params / 1e6:.1f}M parameters, {pair.weight_bytes / 2**20:.1f} MiB, "
            f"canvas {pair.ours.cfg.canvas_length}, prompt {pair.prompt_len}, batch {pair.batch}, "
            f"{pair.steps} denoising steps (built in {time.perf_counter() - t0:.1f} s)"
        )
        model_rows: list[dict] = []
        try:
            with torch.inference_mode():
                if "decoder" in chosen:
                    model_rows += cases.decoder_pass(pair, timer)
                if "hooks" in chosen:
                    model_rows += cases.decoder_pass_hooked(pair, timer)
                if "generate" in chosen or "memory" in chosen:
                    model_rows += cases.generation(pair, timer)
            if "memory" in chosen:
                model_rows += sharded_load_rows(pair, dtype)
            if "patching" in chosen:
                model_rows += cases.patching(pair, timer, args.quick)
            if "sweeps" in chosen:
                model_rows += sweeps(pair, timer, args.quick)
        finally:
            pair.close()
        for r in model_rows:
            r["model"] = name
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
            print(f"    {r['case']}: {fmt(r['ours'], r['unit'])} vs {fmt(r['reference'], r['unit'])}, ratio {ratio}")
        rows += model_rows
        del pair
    elapsed = time.perf_counter() - started
    print(f"\n{table(rows)}\n\ntotal {elapsed:.0f} s")
    out = args.out or Path(__file__).parent / "results" / f"{socket.gethostname() or platform.node()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine,
        "settings": {"repeats": repeats, "warmup": args.warmup, "quick": args.quick, "models": args.models},
        "elapsed_s": elapsed,
        "rows": rows,
    }
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
