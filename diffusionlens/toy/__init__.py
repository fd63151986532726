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


def checkpoint_path(name: str = "toy"):
    """Directory of a shipped checkpoint (config.json, model.safetensors, tokenizer.json): "toy", the
    diffusion toy, or "toy-ar", its autoregressive twin (a Gemma4ForCausalLM)."""
    from diffusionlens.weights.checkpoint import SHIPPED_CHECKPOINTS

    if name not in SHIPPED_CHECKPOINTS:
        raise KeyError(f"No shipped checkpoint {name!r}; choose one of {sorted(SHIPPED_CHECKPOINTS)}")
    return SHIPPED_CHECKPOINTS[name]
