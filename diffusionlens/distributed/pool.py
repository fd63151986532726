"""A pool of Ray actors, one model each, that run `fn(model, memo, item)` for many items."""

from __future__ import annotations

import os
import socket
import time
from collections import deque
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


class WorkItemFailed(RuntimeError):
    """A work item of `ModelPool.map` that could not be done: its function raised, or its worker died on
    every attempt. `index` and `label` name the item, `attempts` says how often it ran, `cause` why the
    last attempt failed."""

    def __init__(self, index: int, label: str, attempts: int, cause: str) -> None:
        self.index, self.label, self.attempts, self.cause = index, label, attempts, cause
        tries = "once" if attempts == 1 else f"{attempts} times"
        super().__init__(f"{label} (item {index}) failed after running {tries}: {cause}")


class _ModelWorker:
    """One model per actor: loaded once, then every task reuses it (and `memo`, for per-worker setup
    such as a sweep's recorded clean run, rebuilt by a replacement worker)."""

    def __init__(self, model_source: Any, load_kwargs: dict[str, Any], torch_threads: int | None) -> None:
        import torch

        from diffusionlens.model import HookedDiffusionGemma

        # Ray starts workers with OMP_NUM_THREADS=1; CPU float sums depend on the thread count, so the
        # pool sets the driver's count and a worker's numbers equal a single-process run's.
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        if "device" not in load_kwargs and torch.cuda.is_available():
            load_kwargs = {**load_kwargs, "device": "cuda"}  # Ray sets CUDA_VISIBLE_DEVICES to this worker's GPU
        self.model = HookedDiffusionGemma.from_pretrained(model_source, progress=False, **load_kwargs)
        self.memo: dict[Any, Any] = {}

    def run(self, fn: Callable[[Any, dict, Any], Any], item: Any) -> Any:
        return fn(self.model, self.memo, item)


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


class ModelPool:
    """`num_workers` Ray actors, each holding the model loaded from `model_source`; `map` hands items
    to whichever worker is free.

    Retries are finite: an item whose worker dies (a crash, out of memory, a killed process) runs again
    on a fresh worker, at most `max_retries` more times; then `map` raises `WorkItemFailed` naming the
    item and the cause. An item whose function raises is not retried (it would raise again): the error
    names the item and the exception. Ray itself neither restarts actors nor retries their tasks (the
    pool replaces a dead worker), so nothing is retried without bound. With GPUs in the cluster each
    worker takes one. On CPU each worker runs torch with `torch_threads` threads (default: this
    process's `torch.get_num_threads()`, so results equal a single-process run here bit for bit; pass
    fewer to avoid oversubscribing a machine that runs several workers).
    """

    def __init__(
        self,
        model_source: Any,
        *,
        num_workers: int = 2,
        address: str | None = None,
        load_kwargs: dict[str, Any] | None = None,
        num_cpus: int | None = None,
        max_retries: int = 2,
        torch_threads: int | None = None,
    ) -> None:
        import torch

        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers must be a positive integer, got {num_workers!r}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an integer >= 0 (0: no retry), got {max_retries!r}")
        ray = connect(address, num_cpus=num_cpus)
        gpus = ray.cluster_resources().get("GPU", 0)
        self.ray = ray
        self.max_retries = max_retries
        self._actor_class = ray.remote(num_gpus=1 if gpus >= 1 else 0, num_cpus=1, max_restarts=0, max_task_retries=0)(
            _ModelWorker
        )
        self._worker_args = (model_source, dict(load_kwargs or {}), torch_threads or torch.get_num_threads())
        self.workers = [self._start_worker() for _ in range(num_workers)]

    def _start_worker(self) -> Any:
        return self._actor_class.remote(*self._worker_args)

    def map(
        self,
        fn: Callable[[Any, dict, Any], Any],
        items: Sequence[Any],
        *,
        progress: bool = True,
        desc: str = "items",
        label: Callable[[Any], str] | None = None,
    ) -> list[Any]:
        """`fn(model, memo, item)` for every item, results in item order. Each worker takes the next
        item as soon as it is free (a slow item holds up no other). One progress bar over all workers.
        `label(item)` names an item in a `WorkItemFailed` (default: its position and repr)."""
        if not self.workers:
            raise RuntimeError("this ModelPool was shut down; start a new one")
        exceptions = self.ray.exceptions
        items = list(items)
        queue = deque(range(len(items)))
        attempts = [0] * len(items)
        results: list[Any] = [None] * len(items)
        running: dict[Any, tuple[int, int]] = {}  # ObjectRef -> (worker slot, item index)
        idle = deque(range(len(self.workers)))

        def failure(index: int, cause: str) -> WorkItemFailed:
            name = label(items[index]) if label is not None else f"{desc} item {repr(items[index])[:120]}"
            return WorkItemFailed(index, name, attempts[index], cause)

        with tqdm(total=len(items), desc=desc, disable=not progress) as bar:
            while queue or running:
                while idle and queue:
                    slot, index = idle.popleft(), queue.popleft()
                    attempts[index] += 1
                    running[self.workers[slot].run.remote(fn, items[index])] = (slot, index)
                (ref,), _ = self.ray.wait(list(running), num_returns=1)
                slot, index = running.pop(ref)
                try:
                    results[index] = self.ray.get(ref)
                except exceptions.RayTaskError as error:  # fn raised: the same input would raise again
                    raise failure(index, _first_line(error.cause or error)) from error.cause
                except exceptions.RayActorError as error:  # the worker process died
                    if error.actor_init_failed:
                        raise RuntimeError(f"a worker could not load the model: {_first_line(error)}") from error
                    self.workers[slot] = self._start_worker()
                    if attempts[index] > self.max_retries:
                        raise failure(index, f"its worker died each time ({_first_line(error)})") from error
                    queue.appendleft(index)
                else:
                    bar.update(1)
                idle.append(slot)
        return results

    def shutdown(self) -> None:
        for worker in self.workers:
            self.ray.kill(worker, no_restart=True)
        self.workers = []
