"""Noise sources: where the sampler's random numbers come from.

`TorchRNGNoise` draws from torch's global RNG in exactly the reference implementation's order
(canvas init, then per step a multinomial draw and a renoising draw), so `torch.manual_seed(s)`
reproduces transformers' `generate` token for token.

`ReplayNoise(seed)` makes every draw a pure function of (seed, canvas, step, purpose): a patched run
sees the same random numbers as the clean run at every step, even if it stops earlier or later, so
any difference between the runs is caused by the intervention. Its draws for a row depend on the batch
shape; `RowReplayNoise(seeds)` gives row i what `ReplayNoise(seeds[i])` gives a batch of one, so a row
replays alone whatever it was batched with.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from jaxtyping import Float, Int


@runtime_checkable
class NoiseSource(Protocol):
    def initial_canvas(
        self, batch: int, length: int, vocab: int, device: torch.device | str, canvas: int
    ) -> Int[torch.Tensor, "batch canvas"]: ...

    def sample(
        self, probs: Float[torch.Tensor, "batch canvas vocab"], canvas: int, step: int
    ) -> Int[torch.Tensor, "batch canvas"]: ...

    def renoise(
        self, batch: int, length: int, vocab: int, device: torch.device | str, canvas: int, step: int
    ) -> Int[torch.Tensor, "batch canvas"]: ...


class TorchRNGNoise:
    """torch's global RNG, consumed in the reference's order (uses `torch.multinomial`)."""

    def initial_canvas(
        self, batch: int, length: int, vocab: int, device: torch.device | str, canvas: int
    ) -> torch.Tensor:
        return torch.randint(low=0, high=vocab, size=(batch, length), device=device)

    def sample(self, probs: torch.Tensor, canvas: int, step: int) -> torch.Tensor:
        batch, length, vocab = probs.shape
        return torch.multinomial(probs.view(-1, vocab), num_samples=1).squeeze(-1).view(batch, length)

    def renoise(
        self, batch: int, length: int, vocab: int, device: torch.device | str, canvas: int, step: int
    ) -> torch.Tensor:
        return torch.randint(low=0, high=vocab, size=(batch, length), device=device)

    def __repr__(self) -> str:
        return "TorchRNGNoise()"


class ReplayNoise:
    """Counter-based noise: each draw depends only on (seed, canvas, step, purpose).

    Sampling uses one uniform number per position and the inverse CDF, which is also cheaper than
    `torch.multinomial` (the reference's sampler spends a large share of each step there).

    Every draw is made on the CPU and then moved, so a run replays the same noise on any device, and a
    model split across devices (or a GPU run checked against a CPU one) sees the same canvas.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)

    def generator(self, canvas: int, step: int, purpose: str) -> torch.Generator:
        """The CPU generator of one draw."""
        digest = hashlib.blake2b(f"{self.seed}/{canvas}/{step}/{purpose}".encode(), digest_size=8).digest()
        generator = torch.Generator()
        generator.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
        return generator

    def initial_canvas(
        self, batch: int, length: int, vocab: int, device: torch.device | str, canvas: int
    ) -> torch.Tensor:
        gen = self.generator(canvas, -1, "init")
        return torch.randint(0, vocab, (batch, length), generator=gen).to(device)

    def sample(self, probs: torch.Tensor, canvas: int, step: int) -> torch.Tensor:
        gen = self.generator(canvas, step, "sample")
        cdf = probs.cumsum(dim=-1)
        uniform = torch.rand(probs.shape[:-1] + (1,), generator=gen, dtype=cdf.dtype).to(probs.device)
        tokens = torch.searchsorted(cdf, uniform * cdf[..., -1:], right=True).squeeze(-1)
        return tokens.clamp_(max=probs.shape[-1] - 1)

    def renoise(
        self, batch: int, length: int, vocab: int, device: torch.device | str, canvas: int, step: int
    ) -> torch.Tensor:
        gen = self.generator(canvas, step, "renoise")
        return torch.randint(0, vocab, (batch, length), generator=gen).to(device)

    def __repr__(self) -> str:
        return f"ReplayNoise(seed={self.seed})"


class RowReplayNoise:
    """A noise source whose row i draws what `ReplayNoise(seeds[i])` draws for a batch of one."""

    def __init__(self, seeds: Sequence[int]) -> None:
        self.sources = [ReplayNoise(s) for s in seeds]

    def _check(self, batch: int) -> None:
        if batch != len(self.sources):
            raise ValueError(f"a batch of {batch} rows needs {batch} seeds, got {len(self.sources)}")

    def initial_canvas(
        self, batch: int, length: int, vocab: int, device: torch.device | str, canvas: int
    ) -> Int[torch.Tensor, "batch canvas"]:
        self._check(batch)
        return torch.cat([s.initial_canvas(1, length, vocab, device, canvas) for s in self.sources])

    def sample(
        self, probs: Float[torch.Tensor, "batch canvas vocab"], canvas: int, step: int
    ) -> Int[torch.Tensor, "batch canvas"]:
        self._check(probs.shape[0])
        return torch.cat([s.sample(probs[i : i + 1], canvas, step) for i, s in enumerate(self.sources)])

    def renoise(
        self, batch: int, length: int, vocab: int, device: torch.device | str, canvas: int, step: int
    ) -> Int[torch.Tensor, "batch canvas"]:
        self._check(batch)
        return torch.cat([s.renoise(1, length, vocab, device, canvas, step) for s in self.sources])

    def __repr__(self) -> str:
        return f"RowReplayNoise(seeds={[s.seed for s in self.sources]})"
