"""Hedged training targets: answer positions that are written only once what they depend on is written.

A denoiser that can compute a whole answer in one pass commits it at step 0, and then the step axis holds
nothing to study. The organism is trained so that some positions *read* other positions of its own canvas:

- **addition** is written right to left as a person carries. Each digit but the last (and but a final carry
  digit) reads the digit to its right, which settles the carry coming into its column; while that digit is
  noise the target spreads evenly over the two digits the column gives with and without a carry.
- **squares** drafts its list left to right, then counts it. Each digit of a square after the first reads the
  square before; while most of that square is noise, the target spreads evenly over this square's digit and
  the next square's digit at the same place. The count reads every character of the list; while most of them
  are noise the target spreads evenly over the true count and its two neighbours (in 0..8).

Everywhere else, and wherever the positions a hedge reads are clean, the target is the answer itself. At
generation the hedged positions stay uncertain until what they read has committed, so the entropy-bound
sampler commits them later, and a hedged guess accepted early is corrected once its dependency is written.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float

from diffusionlens.toy.tasks import ADDITION, MAX_SQUARES, Example
from diffusionlens.toy.tokenizer import VOCAB

__all__ = ["Hedge", "hedge_tensors", "hedges_of"]


@dataclass(frozen=True)
class Hedge:
    """Answer character `position` reads the characters at `reads`; while most of those are noise its target
    is spread evenly over `alternatives` (characters, the true one included)."""

    position: int
    reads: tuple[int, ...]
    alternatives: str


def _addition_hedges(prompt: str, answer: str) -> list[Hedge]:
    a, b = (int(x) for x in ADDITION.pattern.fullmatch(prompt).groups())
    width = max(len(str(a)), len(str(b)))  # a longer answer starts with a final carry digit: not hedged
    hedges = []
    for column in range(1, width):  # column 0, the units, reads nothing
        position = len(answer) - 1 - column
        digit_sum = (a // 10**column) % 10 + (b // 10**column) % 10
        options = {str(digit_sum % 10), str((digit_sum + 1) % 10)}
        hedges.append(Hedge(position, (position + 1,), "".join(sorted(options))))
    return hedges


def _squares_hedges(answer: str) -> list[Hedge]:
    count_text, _, listed = answer.partition(":")
    count = int(count_text)
    options = "".join(str(k) for k in (count - 1, count, count + 1) if 0 <= k <= MAX_SQUARES)
    list_positions = tuple(range(len(count_text), len(count_text) + 1 + len(listed)))  # ':' and the list
    hedges = [Hedge(0, list_positions, options)]
    # Each square after the first reads the one before; unread, a digit may be this square's or the next's.
    starts, squares = [], listed.split()
    position = len(count_text) + 2  # after ": "
    for square in squares:
        starts.append(position)
        position += len(square) + 1
    for j in range(1, len(squares)):
        before = tuple(range(starts[j - 1], starts[j - 1] + len(squares[j - 1])))
        after = str((math.isqrt(int(squares[j])) + 1) ** 2)
        for offset, digit in enumerate(squares[j]):
            alternatives = {digit, after[offset]} if offset < len(after) else {digit}
            hedges.append(Hedge(starts[j] + offset, before, "".join(sorted(alternatives))))
    return hedges


def hedges_of(example: Example) -> list[Hedge]:
    """The hedged positions of one training example (none for tasks without any)."""
    if example.task == "addition":
        return _addition_hedges(example.prompt, example.answer)
    if example.task == "squares":
        return _squares_hedges(example.answer)
    return []


def hedge_tensors(
    examples: Sequence[Example], canvas_length: int, vocab_size: int
) -> tuple[Bool[torch.Tensor, "batch canvas canvas"], Float[torch.Tensor, "batch canvas vocab"]]:
    """Per example and canvas position: which positions it reads (`[b, p, q]` True when p reads q) and the
    spread target it has while most of those are noise (`[b, p, vocab]`, rows summing to 1 at hedged positions,
    0 elsewhere). The answer starts the canvas, so answer character i is canvas position i."""
    reads = torch.zeros(len(examples), canvas_length, canvas_length, dtype=torch.bool)
    spread = torch.zeros(len(examples), canvas_length, vocab_size)
    for row, example in enumerate(examples):
        for hedge in hedges_of(example):
            reads[row, hedge.position, list(hedge.reads)] = True
            ids = [VOCAB[c] for c in hedge.alternatives]
            spread[row, hedge.position, ids] = 1.0 / len(ids)
    return reads, spread
