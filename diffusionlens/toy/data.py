"""Batching of toy-task examples for training a small DiffusionGemma.

A batch holds the left-padded prompts (``[bos] + chars``, pad id 0) for the causal encoder and
the canvas targets (``answer + eos + pad...``, exactly ``canvas_length`` tokens).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch
from transformers import PreTrainedTokenizerFast

from diffusionlens.toy.tasks import Example
from diffusionlens.toy.tokenizer import CANVAS_LENGTH, encode_answer, encode_prompt

__all__ = ["iterate_batches", "make_batch"]


def _prompt_answer(example: Example | tuple[str, str] | tuple[str, str, str]) -> tuple[str, str]:
    if isinstance(example, Example):
        return example.prompt, example.answer
    if len(example) == 2:
        return example[0], example[1]
    if len(example) == 3:
        return example[1], example[2]
    raise ValueError(f"expected an Example, (prompt, answer) or (task, prompt, answer), got {example!r}")


def make_batch(
    tokenizer: PreTrainedTokenizerFast,
    examples: Sequence[Example | tuple[str, str] | tuple[str, str, str]],
    canvas_length: int = CANVAS_LENGTH,
) -> dict[str, torch.Tensor]:
    """Collate examples into int64 tensors.

    Returns ``input_ids`` ``[B, P]`` (left-padded with ``pad_token_id``, each row ``[bos] + chars``),
    ``attention_mask`` ``[B, P]`` (1 on real prompt tokens, 0 on left padding) and ``canvas_ids``
    ``[B, canvas_length]`` (answer chars, eos, then pads). ``P`` is the longest prompt in the batch.
    """
    if len(examples) == 0:
        raise ValueError("make_batch needs at least one example")
    pairs = [_prompt_answer(ex) for ex in examples]
    prompt_ids = [encode_prompt(tokenizer, p) for p, _ in pairs]
    canvas = [encode_answer(tokenizer, a, canvas_length) for _, a in pairs]
    width = max(len(ids) for ids in prompt_ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(pairs), width), pad, dtype=torch.int64)
    attention_mask = torch.zeros((len(pairs), width), dtype=torch.int64)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.int64)
        attention_mask[row, width - len(ids) :] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "canvas_ids": torch.tensor(canvas, dtype=torch.int64),
    }


def iterate_batches(
    tokenizer: PreTrainedTokenizerFast,
    examples: Sequence[Example | tuple[str, str] | tuple[str, str, str]],
    batch_size: int,
    canvas_length: int = CANVAS_LENGTH,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of :func:`make_batch` batches; shuffling uses ``random.Random(seed)`` only."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = list(range(len(examples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        if drop_last and len(idx) < batch_size:
            return
        yield make_batch(tokenizer, [examples[i] for i in idx], canvas_length)
