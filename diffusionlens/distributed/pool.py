"""A pool of Ray actors, one model each, that run `fn(model, memo, item)` for many items."""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlparse

from tqdm.auto import tqdm

INSTALL_HINT = "pip install 'diffusionlens[distributed]'"
CONNECT_TIMEOUT_S = 5.0


def require_ray() -> Any:
    """Import ray, or say which extra installs it."""
    try:
        import ray
    except ImportError:
        raise ImportError(f"Ray is needed to fan work out over workers; install it with {INSTALL_HINT}") from None
    return ray


def _check_reachable(address: str) -> None:
    """Fail in seconds, naming the address, instead of letting ray.init retry for a minute."""
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if parsed.hostname is None or parsed.port is None:
        raise ConnectionError(f"Ray address {address!r} is not host:port (or ray://host:port)")
    try:
        socket.create_connection((parsed.hostname, parsed.port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise ConnectionError(f"cannot reach a Ray cluster at {address}: {error}") from None


def connect(address: str | None = None, *, num_cpus: int | None = None) -> Any:
    """Join the cluster at `address` (host:port or ray://host:port; "auto" finds a local one), or
    start a local Ray without a dashboard. Reuses a connection made earlier in this process."""
    ray = require_ray()
    if address not in (None, "auto"):
        _check_reachable(address)
    if ray.is_initialized():
        return ray
    if address is None:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        return ray
    ray.init(address=address, log_to_driver=False)
    return ray


class _ModelWorker:
    """One model per actor: loaded once, then every task reuses it (and `memo`, for per-worker setup
    such as a sweep's recorded clean run, rebuilt after a restart)."""

    def __init__(self, model_source: Any, load_kwargs: dict[str, Any]) -> None:
        import torch

        from diffusionlens.model import HookedDiffusionGemma

        # Ray gives each worker OMP_NUM_THREADS = its num_cpus (1), so torch runs one thread. CPU float
        # sums depend on the thread count: compare with a single-process run at the same count.
        if "device" not in load_kwargs and torch.cuda.is_available():
            load_kwargs = {**load_kwargs, "device": "cuda"}  # Ray sets CUDA_VISIBLE_DEVICES to this worker's GPU
        self.model = HookedDiffusionGemma.from_pretrained(model_source, progress=False, **load_kwargs)
        self.memo: dict[Any, Any] = {}

    def run(self, fn: Callable[[Any, dict, Any], Any], item: Any) -> Any:
        return fn(self.model, self.memo, item)


class ModelPool:
    """`num_workers` Ray actors, each holding the model loaded from `model_source`.

    Actors restart when they die and their unfinished tasks are retried (Ray's `max_restarts` and
    `max_task_retries`), so a lost worker delays a map but never loses an item. With GPUs in the
    cluster each worker takes one.
    """

    def __init__(
        self,
        model_source: Any,
        *,
        num_workers: int = 2,
        address: str | None = None,
        load_kwargs: dict[str, Any] | None = None,
        num_cpus: int | None = None,
    ) -> None:
        ray = connect(address, num_cpus=num_cpus)
        gpus = ray.cluster_resources().get("GPU", 0)
        actor_class = ray.remote(num_gpus=1 if gpus >= 1 else 0, num_cpus=1, max_restarts=-1, max_task_retries=-1)(
            _ModelWorker
        )
        self.ray = ray
        self.workers = [actor_class.remote(model_source, dict(load_kwargs or {})) for _ in range(num_workers)]

    def submit(self, fn: Callable[[Any, dict, Any], Any], items: Sequence[Any]) -> list[Any]:
        """Queue `fn(model, memo, item)` for every item, round-robin over workers; returns ObjectRefs."""
        return [self.workers[i % len(self.workers)].run.remote(fn, item) for i, item in enumerate(items)]

    def gather(self, refs: list[Any], *, progress: bool = True, desc: str = "cells") -> list[Any]:
        """Wait for every ref with one progress bar over all workers; results in submission order."""
        pending = list(refs)
        with tqdm(total=len(refs), desc=desc, disable=not progress) as bar:
            while pending:
                done, pending = self.ray.wait(pending, num_returns=1)
                bar.update(len(done))
        return self.ray.get(refs)

    def map(self, fn: Callable[[Any, dict, Any], Any], items: Sequence[Any], **kwargs: Any) -> list[Any]:
        return self.gather(self.submit(fn, items), **kwargs)

    def shutdown(self) -> None:
        for worker in self.workers:
            self.ray.kill(worker, no_restart=True)
        self.workers = []
