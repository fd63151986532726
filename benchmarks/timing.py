"""Interleaved timing: warm up every contender, then repeat rounds in which each runs once (in an
order that alternates between rounds), and keep the median of each. CUDA is synchronised around
every timed call so that asynchronous kernels are counted where they run."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Timer:
    device: str
    warmup: int = 1
    repeats: int = 5

    def measure(self, contenders: dict[str, Callable[[], object]], repeats: int | None = None) -> dict[str, float]:
        """Median seconds per call of each contender, runs interleaved within one process."""
        repeats = repeats or self.repeats
        names = list(contenders)
        for _ in range(self.warmup):
            for name in names:
                contenders[name]()
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(repeats):
            for name in names if r % 2 == 0 else reversed(names):
                sync(self.device)
                start = time.perf_counter()
                contenders[name]()
                sync(self.device)
                times[name].append(time.perf_counter() - start)
        return {name: statistics.median(ts) for name, ts in times.items()}


def machine_description(device: str, dtype: torch.dtype, threads: int) -> dict[str, object]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import transformers

    info: dict[str, object] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": device,
        "dtype": str(dtype).replace("torch.", ""),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info
