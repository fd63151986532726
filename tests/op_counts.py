"""Counting the copies and kernels a forward pass or a generation makes, at the dispatcher, for
comparisons with transformers.

A dtype conversion or `.contiguous()` that allocates is an `aten::copy_` kernel on a GPU; in a
16-bit model each one over the hidden state costs bandwidth at every layer of every step. Every op
that writes memory (new storage, or in place) is at least one kernel launch, which is what a
generate step of a large model on a GPU spends its host time on. Views are free and not counted.
Count both models under the same grad mode: `inference_mode` hands composite ops (`linear`,
`softmax`) to the dispatcher whole, where `no_grad` hands over their decompositions.
"""

from __future__ import annotations

import collections
import traceback
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_CONVERSIONS = ("to", "_to_copy", "type_as", "clone", "contiguous", "copy_")


class CopyCounter(TorchDispatchMode):
    """Conversions and clones whose result is new storage: calls and bytes written, by file:line."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: collections.Counter[str] = collections.Counter()
        self.bytes_by_site: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        source = args[0] if args else None
        if (
            func.overloadpacket.__name__ in _CONVERSIONS
            and isinstance(out, torch.Tensor)
            and isinstance(source, torch.Tensor)
            and out.data_ptr() != source.data_ptr()
            and out.numel() > 1  # a scalar (our embed_scale, rounded per call) is a launch, not bandwidth
        ):
            site = _caller()
            self.sites[site] += 1
            self.bytes_by_site[site] += out.numel() * out.element_size()
        return out

    @property
    def calls(self) -> int:
        return sum(self.sites.values())

    @property
    def bytes(self) -> int:
        return sum(self.bytes_by_site.values())


class WritingOpCounter(TorchDispatchMode):
    """Ops that write memory (their output is new storage, or they work in place), by op name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        writes_new = isinstance(out, torch.Tensor) and out.untyped_storage().data_ptr() not in inputs
        if name.endswith("_") or writes_new or isinstance(out, (tuple, list)):
            self.ops[name] += 1
        return out

    @property
    def calls(self) -> int:
        return sum(self.ops.values())


def _caller() -> str:
    frames = [f for f in traceback.extract_stack() if "/torch/" not in f.filename and f.filename != __file__]
    frame = frames[-1]
    return f"{frame.filename.split('site-packages/')[-1].split('/diffusionlens/')[-1]}:{frame.lineno}"


def count_copies(run: Callable[[], object]) -> CopyCounter:
    counter = CopyCounter()
    with torch.no_grad(), counter:
        run()
    return counter


def count_generation(generate: Callable[[], object], seed: int = 0) -> tuple[object, CopyCounter, WritingOpCounter]:
    """`generate()` seeded and under `inference_mode` (one grad mode for every model compared, see above):
    its result, the copies it made and the ops that wrote memory."""
    copies, writes = CopyCounter(), WritingOpCounter()
    torch.manual_seed(seed)
    with torch.inference_mode(), copies, writes:
        result = generate()
    return result, copies, writes
