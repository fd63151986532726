"""Monitorability on the toy tasks: from the state at step s, can a simple monitor tell whether the
final answer will be correct?

The monitor reads the step-s draft (the argmax canvas) and checks it with the task's own solver: a
string match. Its AUROC against final correctness, as a function of s, says how early an observer who
only reads tokens can see where the run is going.
"""

from __future__ import annotations

import torch

from diffusionlens.analysis.transparency import auroc
from diffusionlens.model import HookedDiffusionGemma
from diffusionlens.sampling.noise import ReplayNoise
from diffusionlens.sampling.settings import GenerationSettings
from diffusionlens.toy.data import make_batch
from diffusionlens.toy.tasks import TASKS, make_dataset, task_of
from diffusionlens.toy.tokenizer import CANVAS_LENGTH, decode_canvas


def draft_monitor_auroc(
    model: HookedDiffusionGemma,
    *,
    n: int = 100,
    seed: int = 777,
    tasks: list[str] | None = None,
    batch_size: int = 100,
    **generate_kwargs,
) -> dict[int, float]:
    """AUROC, per step s, of "the step-s draft already solves the problem" as a predictor of "the final
    answer is correct", over `n` held-out problems per task. Rows that stopped before step s keep their
    last draft (what an observer would see)."""
    scores: dict[int, list[float]] = {}
    labels: list[bool] = []
    tokenizer = model.tokenizer
    for task in tasks or list(TASKS):
        data = make_dataset(task, n, seed=seed, split="eval")
        for start in range(0, n, batch_size):
            chunk = data.examples[start : start + batch_size]
            batch = make_batch(tokenizer, chunk, CANVAS_LENGTH)
            kwargs = {"noise": ReplayNoise(seed + start), "max_new_tokens": CANVAS_LENGTH, "progress": False}
            with torch.inference_mode():
                result = model.generate(
                    batch["input_ids"], attention_mask=batch["attention_mask"], **{**kwargs, **generate_kwargs}
                )
            trace = result.trace[0]
            finals = result.sequences[:, batch["input_ids"].shape[1] :]
            for row, example in enumerate(chunk):
                checker = task_of(example.prompt)
                labels.append(checker.is_correct(example.prompt, decode_canvas(tokenizer, finals[row].tolist())))
                for step in range(model_steps(generate_kwargs)):
                    draft = trace.argmax[min(step, trace.n_steps - 1), row].tolist()
                    ok = checker.is_correct(example.prompt, decode_canvas(tokenizer, draft))
                    scores.setdefault(step, []).append(float(ok))
    label_tensor = torch.tensor(labels)
    return {step: auroc(torch.tensor(values), label_tensor) for step, values in scores.items()}


def model_steps(generate_kwargs: dict) -> int:
    """The step budget these generate keywords give (the default lives in GenerationSettings)."""
    return int(generate_kwargs.get("max_denoising_steps", GenerationSettings.max_denoising_steps))
