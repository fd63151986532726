"""Toy model organism: synthetic tasks, a character-level tokenizer and batching."""

from diffusionlens.toy.data import iterate_batches, make_batch
from diffusionlens.toy.tasks import (
    EXAMPLE_PROMPTS,
    TASKS,
    TRAINING_VARIANTS,
    Example,
    Task,
    ToyDataset,
    is_held_out,
    make_dataset,
    sample_examples,
    solve,
    split_of,
    task_of,
)
from diffusionlens.toy.tokenizer import (
    BOS_ID,
    CANVAS_LENGTH,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    VOCAB,
    build_tokenizer,
    decode_canvas,
    encode_answer,
    encode_prompt,
)

__all__ = [
    "checkpoint_path",
    "BOS_ID",
    "CANVAS_LENGTH",
    "EOS_ID",
    "EXAMPLE_PROMPTS",
    "PAD_ID",
    "TASKS",
    "TRAINING_VARIANTS",
    "UNK_ID",
    "VOCAB",
    "Example",
    "Task",
    "ToyDataset",
    "build_tokenizer",
    "decode_canvas",
    "encode_answer",
    "encode_prompt",
    "is_held_out",
    "iterate_batches",
    "make_batch",
    "make_dataset",
    "sample_examples",
    "solve",
    "split_of",
    "task_of",
]


def checkpoint_path():
    """Directory of the shipped toy checkpoint (config.json, model.safetensors, tokenizer.json)."""
    from diffusionlens.loading import SHIPPED_CHECKPOINTS

    return SHIPPED_CHECKPOINTS["toy"]
