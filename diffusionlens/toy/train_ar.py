"""Train the autoregressive twin of the toy: the same architecture, tokenizer and tasks, teacher forcing.

Each example is one sequence `[bos] prompt answer [eos]`, right-padded (a causal model never looks
right, so padding at the end needs no attention mask). The loss is next-token cross-entropy on the
answer tokens and the eos only: the prompt is given, as it is to the diffusion toy.

    python -m diffusionlens.toy.train_ar --out runs/toy-ar --steps 4000

Seeded; resumable from --out (weights, optimiser, step and RNG, in safetensors + JSON), with the
diffusion trainer's checkpoint format and learning-rate schedule.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from tqdm.auto import tqdm

from diffusionlens.causal_lm import HookedGemma4CausalLM
from diffusionlens.toy.tasks import Example
from diffusionlens.toy.tokenizer import PAD_ID, encode_answer, encode_prompt
from diffusionlens.toy.train import (
    CommonTrainSettings,
    apply_update,
    evaluate_in_eval_mode,
    learning_rate,
    run_training_command,
    save_checkpoint,
    setting,
    start_run,
    training_examples,
)
from diffusionlens.toy.train import toy_config as diffusion_toy_config

IGNORE = -100  # cross_entropy's ignore_index: prompt and padding positions carry no loss


@dataclass
class ARTrainSettings(CommonTrainSettings):
    """The twin's settings: the diffusion trainer's common ones (fewer steps, 50 evaluation examples), then a
    time budget, the device and where a staged run's data stream goes on from."""

    steps: int = setting(4000, "optimiser steps; the cosine schedule reaches --min-lr at the last")
    eval_examples: int = setting(50, "held-out problems per task in each evaluation")
    # The cosine schedule runs on whichever of steps or seconds is further along, so the learning rate has
    # decayed when the budget ends.
    max_seconds: float = setting(0.0, "a wall-clock budget (0: none); training stops there")
    device: str = setting("cpu", "cuda trains on a GPU (float32; the data stream is the same)")
    init_step: int = setting(
        0, "with --init-from, where the data stream goes on from, so a later stage does not replay earlier batches"
    )


def toy_ar_config():
    """The diffusion toy's architecture (width, depth, layer pattern, MoE shape, vocabulary)."""
    return diffusion_toy_config()


def make_ar_batch(tokenizer, examples: list[Example]) -> dict[str, Int[torch.Tensor, "batch seq"]]:
    """`input_ids` `[bos] prompt answer eos`, right-padded; `labels` = the next token on answer and eos
    positions (aligned with `input_ids`: labels[:, t] is predicted from position t), IGNORE elsewhere."""
    rows, targets = [], []
    for ex in examples:
        prompt = encode_prompt(tokenizer, ex.prompt)
        answer = [t for t in encode_answer(tokenizer, ex.answer, canvas_length=len(ex.answer) + 1)]
        seq = prompt + answer
        rows.append(seq)
        # position t predicts seq[t + 1]; only answer tokens (and eos) are supervised
        targets.append([IGNORE] * (len(prompt) - 1) + answer + [IGNORE])
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (seq, target) in enumerate(zip(rows, targets, strict=True)):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, : len(target)] = torch.tensor(target)
    return {"input_ids": input_ids, "labels": labels}


def ar_loss(model: HookedGemma4CausalLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(batch["input_ids"])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE)


def train_ar(
    out: str | Path, settings: ARTrainSettings | None = None, progress: bool = True, evaluate_fn=None
) -> HookedGemma4CausalLM:
    """Train (or resume) into `out`; `evaluate_fn(model, tokenizer, step)` runs every `eval_every` steps."""
    s = settings or ARTrainSettings()
    out = Path(out)
    run = start_run(HookedGemma4CausalLM, out, s, toy_ar_config(), device=s.device)
    model, tokenizer, log = run.model, run.tokenizer, run.log
    began = time.time() - (log[-1]["seconds"] if log else 0.0)
    bar = tqdm(range(run.start, s.steps), initial=run.start, total=s.steps, desc="train-toy-ar", disable=not progress)
    for step in bar:
        schedule_step = step
        if s.max_seconds > 0:
            schedule_step = max(step, int(s.steps * (time.time() - began) / s.max_seconds))
        lr = learning_rate(schedule_step, s)
        examples = training_examples(s.init_step + step, s, run.task_weights)
        batch = {k: v.to(s.device) for k, v in make_ar_batch(tokenizer, examples).items()}
        loss = ar_loss(model, batch)
        apply_update(model, run.optimizer, loss, lr, s.grad_clip)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        entry = {"step": step + 1, "loss": loss.item(), "lr": lr, "seconds": time.time() - began}
        if evaluate_fn is not None and (step + 1) % s.eval_every == 0:
            entry["eval"] = evaluate_in_eval_mode(model, evaluate_fn, tokenizer, step + 1)
            tqdm.write(f"step {step + 1}: {json.dumps(entry['eval'])}")
        log.append(entry)
        out_of_time = s.max_seconds > 0 and entry["seconds"] >= s.max_seconds
        if (step + 1) % s.save_every == 0 or step + 1 == s.steps or out_of_time:
            save_checkpoint(out, model, run.optimizer, step + 1, s, run.generator, log)
        if out_of_time:
            tqdm.write(f"stopping at step {step + 1}: --max-seconds {s.max_seconds:g} reached")
            break
    return model.eval().requires_grad_(False)


def main(argv: list[str] | None = None, prog: str = "python -m diffusionlens.toy.train_ar") -> None:
    from diffusionlens.toy.twin import quick_eval_ar

    def evaluate_fn_of(settings: ARTrainSettings) -> Callable[..., Any]:
        return lambda m, t, step: quick_eval_ar(m, n=settings.eval_examples, seed=step)

    command = (argv, prog, "Train the toy's autoregressive twin (resumes from --out).", "runs/toy-ar")
    run_training_command(ARTrainSettings, train_ar, evaluate_fn_of, command)


if __name__ == "__main__":
    main()
