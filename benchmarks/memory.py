"""Peak resident memory while loading a sharded checkpoint, measured in a fresh process.

`python benchmarks/memory.py DIR --lib ours|transformers --dtype float32 [--warmup DIR2]` imports
everything, loads and frees the small checkpoint DIR2 if given (so that one-time lazy imports, about
120 MiB of torch._dynamo and friends, are not counted as load memory), reads the resident set size
(the baseline), loads DIR, reads every weight once (a lazily mapped file counts only
once touched), and prints JSON with the peak RSS over the process's life
(`resource.getrusage`, or VmHWM where a fork
inherited the parent's ru_maxrss) minus that baseline.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from diffusionlens.toy import checkpoint_path


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """This process's peak RSS. `getrusage`'s ru_maxrss survives execve, so a child forked from a large
    parent (this benchmark, holding two models) reports the parent's RSS at fork time; VmHWM belongs
    to the process's own address space. The smaller of the two is this process's own peak."""
    rusage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    try:
        with open("/proc/self/status") as f:
            hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return rusage
    return min(rusage, hwm)


def checkpoint_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def load_peak(directory: Path, lib: str, dtype: str, warmup: Path | None = None) -> dict[str, int]:
    """Run this file in a subprocess that loads `directory` with `lib`; returns its measurements."""
    cmd = [sys.executable, str(Path(__file__).resolve()), str(directory), "--lib", lib, "--dtype", dtype]
    cmd += ["--warmup", str(warmup)] if warmup is not None else []
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def sharded_load_rows(pair, dtype: torch.dtype) -> list[dict]:
    """Save `pair.ours` in four or more shards, then load it in fresh processes with both libraries."""
    from benchmarks.cases import row

    name = str(dtype).replace("torch.", "")
    with tempfile.TemporaryDirectory(prefix="diffusionlens-shards-") as tmp:
        directory = Path(tmp)
        pair.ours.to("cpu").save_pretrained(directory, max_shard_size=max(pair.weight_bytes // 4, 1 << 20))
        pair.ours.to(pair.reference.device)
        size = checkpoint_bytes(directory)
        shards = len(list(directory.glob("*.safetensors")))
        warm = Path(checkpoint_path())
        ours = load_peak(directory, "ours", name, warm)
        ref = load_peak(directory, "transformers", name, warm)
        cold = load_peak(directory, "ours", name)
    note = (
        f"{shards} shards, {size / 2**20:.1f} MiB; transformers {ref['delta'] / size:.2f}x; "
        f"ours without warm-up load {cold['delta'] / size:.2f}x"
    )
    return [row("5 load peak RSS / weights", ours["delta"], size, 1.3, note, unit="B")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--lib", choices=["ours", "transformers"], default="ours")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--warmup", type=Path, default=None, help="a small checkpoint to load and free first")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    from transformers import DiffusionGemmaForBlockDiffusion
    from transformers.utils import logging

    from diffusionlens import HookedDiffusionGemma

    logging.set_verbosity_error()

    def load(directory: Path):
        if args.lib == "ours":
            return HookedDiffusionGemma.from_pretrained(directory, dtype=dtype, progress=False)
        return DiffusionGemmaForBlockDiffusion.from_pretrained(str(directory), dtype=dtype)

    if args.warmup is not None:
        del_me = load(args.warmup)
        del del_me
        gc.collect()
    baseline = current_rss()
    model = load(args.directory)
    # safetensors may map the files lazily: read every weight once, as the first forward pass would,
    # so that the pages a loaded model needs are resident and counted.
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.sum()
    peak = peak_rss()
    print(json.dumps({"baseline": baseline, "peak": peak, "delta": peak - baseline, "after": current_rss()}))
    del model


if __name__ == "__main__":
    main()
