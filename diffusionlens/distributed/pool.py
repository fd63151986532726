"""A pool of Ray actors, one model each, that run `fn(model, memo, item)` for many items."""

from __future__ import annotations

import os
import socket
import time
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


# A Ray cluster's GCS (host:port) and its Ray Client server (ray://host:port) both speak gRPC, i.e.
# HTTP/2: sent a client preface, an HTTP/2 server answers with a SETTINGS frame (RFC 9113 §3.4).
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # + empty SETTINGS
_SETTINGS_FRAME = 4


def _check_reachable(address: str) -> None:
    """Fail in seconds, naming the address, instead of letting ray.init retry for a minute or more.

    A TCP connection is not enough: ray.init keeps retrying for minutes against a listener that is not a
    Ray cluster (a silent one, or the dashboard's HTTP port). So the check also asks for an HTTP/2
    handshake, which the cluster's gRPC servers answer at once; with `RAY_USE_TLS` set it stops at TCP."""
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    try:
        port = parsed.port
    except ValueError:
        port = None
    if parsed.hostname is None or port is None:
        raise ConnectionError(f"Ray address {address!r} is not host:port (or ray://host:port)")
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    try:
        with socket.create_connection((parsed.hostname, port), timeout=CONNECT_TIMEOUT_S) as sock:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
                return
            sock.sendall(_HTTP2_PREFACE)
            header = b""
            while len(header) < 9:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = sock.recv(9 - len(header))
                if not chunk:
                    break
                header += chunk
    except TimeoutError:
        raise ConnectionError(
            f"cannot reach a Ray cluster at {address}: no answer within {CONNECT_TIMEOUT_S:g} s"
        ) from None
    except OSError as error:
        raise ConnectionError(f"cannot reach a Ray cluster at {address}: {error}") from None
    if len(header) < 9 or header[3] != _SETTINGS_FRAME:
        raise ConnectionError(
            f"something listens at {address}, but not a Ray cluster: it does not answer as gRPC (HTTP/2) does. "
            "Give the head node's GCS address (host:6379 by default) or ray://host:10001 for Ray Client, "
            "not the dashboard's port"
        )


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
        if not self.workers:
            raise RuntimeError("this ModelPool was shut down; start a new one")
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
