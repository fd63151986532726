"""Train the toy DiffusionGemma on the synthetic tasks (nanoGPT-style: one plain loop).

Objective, matching the sampler: corrupt each answer position to a uniform random token with
probability r ~ U(0, 1) per example, predict the clean canvas (answer, eos, pads) at every position.
On half the batches a first pass without gradient supplies self-conditioning logits, scaled by a
temperature drawn from the sampler's range, exactly as generation feeds them back.

    python -m diffusionlens.toy.train --out runs/toy --steps 6000

Seeded and deterministic on CPU; resumable: rerunning with the same --out continues from the last
checkpoint (weights, optimiser state, step and RNG state, all in safetensors + JSON).

The task mix (``--task-weights``) may also name the training-only slices in
:data:`diffusionlens.toy.tasks.TRAINING_VARIANTS` (multi-digit additions, squares bounds next to a square);
evaluation always samples the plain tasks.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float, Int
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from diffusionlens.config import FULL, SLIDING, DiffusionGemmaConfig
from diffusionlens.losses import denoising_loss
from diffusionlens.model import HookedDiffusionGemma
from diffusionlens.toy.data import make_batch
from diffusionlens.toy.hedges import hedge_tensors
from diffusionlens.toy.tasks import EXAMPLE_PROMPTS, Example, make_dataset
from diffusionlens.toy.tokenizer import CANVAS_LENGTH, PAD_ID, VOCAB, build_tokenizer

if TYPE_CHECKING:
    from diffusionlens.causal_lm import HookedGemma4CausalLM

# Addition's answers are short (1-4 characters), so per batch it sees the least answer signal: it gets the
# largest share of batches together with the hard squares task.
TASK_WEIGHTS = {"addition": 0.35, "squares": 0.35, "sort": 0.15, "reverse": 0.15}


def toy_config(**overrides) -> DiffusionGemmaConfig:
    """The shipped toy architecture: the real model's layer kinds at a size a laptop trains."""
    base = dict(
        vocab_size=len(VOCAB),
        hidden_size=192,
        intermediate_size=384,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=48,
        global_head_dim=96,
        num_global_key_value_heads=1,
        layer_types=(SLIDING, SLIDING, FULL, SLIDING, SLIDING, FULL),
        sliding_window=16,
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=128,
        canvas_length=CANVAS_LENGTH,
        max_position_embeddings=512,
    )
    base.update(overrides)
    return DiffusionGemmaConfig(**base)


def setting(default: Any, about: str) -> Any:
    """A settings field: its default, and the help text of its flag in the trainers' command line
    (`run_training_command`)."""
    return field(default=default, metadata={"help": about})


@dataclass
class CommonTrainSettings:
    """The settings both toy trainers read (this one and `train_ar`'s twin): schedule, optimiser,
    evaluation and checkpoint cadence, the task mix. Each trainer's own settings extend it."""

    steps: int = setting(6000, "optimiser steps; the cosine schedule reaches --min-lr at the last")
    batch_size: int = setting(64, "training examples per step")
    lr: float = setting(3e-3, "the peak learning rate, reached after --warmup linearly rising steps")
    min_lr: float = setting(1e-4, "the learning rate the cosine schedule ends at")
    warmup: int = setting(200, "steps of linear learning-rate warmup")
    weight_decay: float = setting(0.01, "AdamW's weight decay")
    grad_clip: float = setting(1.0, "the gradient norm is clipped to this before each step")
    eval_every: int = setting(500, "evaluate on held-out problems every this many steps")
    eval_examples: int = setting(64, "held-out problems per task in each evaluation")
    save_every: int = setting(250, "write a checkpoint every this many steps (and at the last)")
    seed: int = setting(
        0, "seeds the initial weights, the noise and the data stream (a pure function of seed and step)"
    )
    task_weights: str = setting(
        ",".join(f"{task}={weight}" for task, weight in TASK_WEIGHTS.items()),
        "the task mix, e.g. addition=0.5,squares=0.5",
    )
    init_from: str = setting(
        "",
        "a checkpoint directory to start from (weights only, fresh optimiser and schedule): continues an earlier "
        "run whose optimiser state is gone; ignored when --out already holds a run to resume",
    )


@dataclass
class TrainSettings(CommonTrainSettings):
    """The diffusion toy's settings: the common ones, then self-conditioning and the pad weight."""

    self_cond_prob: float = setting(0.5, "the share of batches trained with self-conditioning")
    t_min: float = setting(0.4, "self-conditioning logits are divided by a temperature drawn from [t-min, t-max]")
    t_max: float = setting(0.8, "see --t-min")
    # Pads fill most of the 48-token canvas and are learnt at once; full weight on them would drown the
    # answer positions (and short-answer tasks most of all).
    pad_weight: float = setting(0.1, "the loss weight of pad targets")
    plausible_noise: float = setting(
        0.5, "with hedged targets: the share of noised hedged positions that show one of their alternatives"
    )
    hedged_targets: bool = setting(
        False,
        "train addition right to left and the squares list in order, then its count off it (toy.hedges); "
        "off: exact targets",
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.plausible_noise <= 1.0:
            raise ValueError(f"plausible_noise is a probability: give a value in [0, 1], not {self.plausible_noise}")


def parse_task_weights(text: str) -> dict[str, float]:
    """`"addition=0.35,squares=0.35"` -> {"addition": 0.35, "squares": 0.35}."""
    weights = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        task, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"task weight {item!r} should look like task=weight, e.g. addition=0.35")
        weights[task.strip()] = float(value)
    if not weights:
        raise ValueError("task_weights names no task; e.g. addition=0.5,squares=0.5")
    return weights


def learning_rate(step: int, s: CommonTrainSettings) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = min(1.0, (step - s.warmup) / max(1, s.steps - s.warmup))
    return s.min_lr + 0.5 * (s.lr - s.min_lr) * (1 + math.cos(math.pi * progress))


def corrupt(canvas: torch.Tensor, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Replace each position by a uniform random token with a per-example probability r ~ U(0, 1)."""
    return corrupt_with_mask(canvas, vocab, generator)[0]


def corrupt_with_mask(
    canvas: Int[torch.Tensor, "batch canvas"], vocab: int, generator: torch.Generator
) -> tuple[Int[torch.Tensor, "batch canvas"], Bool[torch.Tensor, "batch canvas"]]:
    """`corrupt`'s noisy canvas and which positions it replaced (a replacement may draw the same token)."""
    batch, length = canvas.shape
    rate = torch.rand(batch, 1, generator=generator)
    noisy = torch.rand(batch, length, generator=generator) < rate
    random_tokens = torch.randint(0, vocab, (batch, length), generator=generator)
    return torch.where(noisy, random_tokens, canvas), noisy


def training_loss(
    model: HookedDiffusionGemma, batch: dict[str, torch.Tensor], s: TrainSettings, generator: torch.Generator
) -> torch.Tensor:
    """The denoising loss of one batch. With `hedge_reads` and `hedge_spread` in the batch (`toy.hedges`), a
    hedged position is trained towards its spread target where the noise replaced most of what it reads, and
    its own noise is, with probability `s.plausible_noise`, one of its alternatives (`plausible_hedge_noise`)."""
    target = batch["canvas_ids"]
    noisy, replaced = corrupt_with_mask(target, model.cfg.vocab_size, generator)
    if "hedge_spread" in batch:
        noisy = plausible_hedge_noise(noisy, replaced, batch["hedge_spread"], s.plausible_noise, generator)
    state = model.encode(batch["input_ids"], batch["attention_mask"])
    self_cond = None
    if torch.rand((), generator=generator) < s.self_cond_prob:
        with torch.no_grad():
            temperature = s.t_min + (s.t_max - s.t_min) * float(torch.rand((), generator=generator))
            self_cond = model.denoise(noisy, state) / temperature
    logits = model.denoise(noisy, state, self_cond)
    # Pads are down-weighted, not dropped, so no pad masking on top of the weights.
    weights = torch.where(target == PAD_ID, s.pad_weight, 1.0)
    if "hedge_reads" not in batch:
        return denoising_loss(logits, target, weights=weights)
    hidden = hidden_hedges(batch["hedge_reads"], replaced)
    return denoising_loss(logits, target, weights=weights, spread_targets=batch["hedge_spread"] * hidden.unsqueeze(-1))


def plausible_hedge_noise(
    noisy: Int[torch.Tensor, "batch canvas"],
    replaced: Bool[torch.Tensor, "batch canvas"],
    spread: Float[torch.Tensor, "batch canvas vocab"],
    probability: float,
    generator: torch.Generator,
) -> Int[torch.Tensor, "batch canvas"]:
    """`noisy` with each replaced hedged position redrawn, with `probability`, from its alternatives.

    At generation the sampler commits a hedged guess before what it reads is written, and a wrong guess then
    sits in the canvas looking like any written digit. Uniform noise almost never shows one, so a model trained
    on it alone trusts the guess; this noise teaches it to recompute the position once it can read."""
    hedged = spread.sum(-1) > 0
    flat = spread.reshape(-1, spread.shape[-1]).clone()
    flat[~hedged.reshape(-1)] = 1.0  # rows without a hedge: any draw, unused
    alternative = torch.multinomial(flat, 1, generator=generator).view(noisy.shape)
    redraw = hedged & replaced & (torch.rand(noisy.shape, generator=generator) < probability)
    return torch.where(redraw, alternative, noisy)


def hidden_hedges(
    reads: Bool[torch.Tensor, "batch canvas canvas"], replaced: Bool[torch.Tensor, "batch canvas"]
) -> Bool[torch.Tensor, "batch canvas"]:
    """The hedged positions most of whose reads the noise replaced (a position that reads nothing never is)."""
    return 2 * (reads & replaced.unsqueeze(1)).sum(-1) > reads.sum(-1)


def training_examples(step: int, s: CommonTrainSettings, task_weights: dict[str, float]) -> list[Example]:
    """Training step `step`'s examples (`s.batch_size` of the task mix, never an example prompt).

    Each step's data is a pure function of (seed, step, task mix): resuming replays and skips nothing."""
    data = make_dataset(
        list(task_weights),
        s.batch_size,
        seed=s.seed * 1_000_003 + step,
        split="train",
        weights=list(task_weights.values()),
        exclude=EXAMPLE_PROMPTS.values(),
    )
    return data.examples


def save_checkpoint(out: Path, model, optimizer, step: int, s: CommonTrainSettings, generator, log: list) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tensors, meta = {}, {"step": step, "settings": asdict(s), "log": log, "param_groups": []}
    for i, group in enumerate(optimizer.param_groups):
        meta["param_groups"].append({k: v for k, v in group.items() if k != "params"})
        for j, param in enumerate(group["params"]):
            for key, value in optimizer.state.get(param, {}).items():
                tensors[f"{i}.{j}.{key}"] = value.detach().clone().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.data"] = generator.get_state()
    tmp = out / "training_state.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(out / "training_state.safetensors")
    (out / "training_state.json").write_text(json.dumps(meta, indent=1))


def load_checkpoint(out: Path, model, optimizer, generator) -> tuple[int, list]:
    meta = json.loads((out / "training_state.json").read_text())
    tensors = load_file(str(out / "training_state.safetensors"))
    for i, group in enumerate(optimizer.param_groups):
        group.update(meta["param_groups"][i])
        for j, param in enumerate(group["params"]):
            # Moments follow their parameter's device; AdamW keeps its scalar step count on the CPU.
            state = {
                k.split(".", 2)[2]: v.to(param.device) if v.ndim else v
                for k, v in tensors.items()
                if k.startswith(f"{i}.{j}.")
            }
            if state:
                optimizer.state[param] = state
    torch.set_rng_state(tensors["rng.torch"])
    generator.set_state(tensors["rng.data"])
    return meta["step"], meta["log"]


@dataclass
class TrainingRun:
    """What a toy trainer's loop starts from: the model (resumed from `out`, loaded from `init_from`, or
    fresh), its tokenizer, optimiser and data generator, the parsed task mix, and the step and log to go on from."""

    model: Any
    tokenizer: Any
    task_weights: dict[str, float]
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    start: int
    log: list


def start_run(
    model_class: type[HookedDiffusionGemma] | type[HookedGemma4CausalLM],
    out: Path,
    s: CommonTrainSettings,
    fresh_config: Any,
    device: str | None = None,
) -> TrainingRun:
    """Both toy trainers' start: resume from `out` if it holds a run, else start from `s.init_from`'s weights
    or `model_class.from_config(fresh_config)`; the model in training mode (on `device` if given)."""
    task_weights = parse_task_weights(s.task_weights)  # a bad mix fails before any work
    torch.manual_seed(s.seed)
    tokenizer = build_tokenizer()
    resuming = (out / "training_state.json").exists()
    if resuming:
        model = model_class.from_pretrained(out, progress=False)
    elif s.init_from:
        model = model_class.from_pretrained(s.init_from, progress=False)
    else:
        model = model_class.from_config(fresh_config, seed=s.seed)
    model.tokenizer = tokenizer
    if device is not None:
        model.to(device)
    model.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay, betas=(0.9, 0.98))
    # The data generator is checkpointed by both trainers (the shared format), used by the diffusion one.
    generator = torch.Generator().manual_seed(s.seed)
    start, log = load_checkpoint(out, model, optimizer, generator) if resuming else (0, [])
    return TrainingRun(model, tokenizer, task_weights, optimizer, generator, start, log)


def apply_update(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: Float[torch.Tensor, ""], lr: float, grad_clip: float
) -> None:
    """One optimiser step on `loss` at learning rate `lr`, the gradient norm clipped to `grad_clip`."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()


def evaluate_in_eval_mode(model: torch.nn.Module, evaluate_fn: Callable, tokenizer, step: int) -> Any:
    """`evaluate_fn(model, tokenizer, step)` with the model in eval mode, back in training mode after."""
    model.eval()
    result = evaluate_fn(model, tokenizer, step)
    model.train()
    return result


def train(
    out: str | Path,
    settings: TrainSettings | None = None,
    config: DiffusionGemmaConfig | None = None,
    progress: bool = True,
    evaluate_fn=None,
) -> HookedDiffusionGemma:
    """Train (or resume) into directory `out`; returns the model. `evaluate_fn(model, tokenizer, step)`
    runs every `eval_every` steps and its result is logged."""
    s = settings or TrainSettings()
    out = Path(out)
    run = start_run(HookedDiffusionGemma, out, s, config or toy_config())
    model, tokenizer, generator, log = run.model, run.tokenizer, run.generator, run.log
    bar = tqdm(range(run.start, s.steps), initial=run.start, total=s.steps, desc="train-toy", disable=not progress)
    began = time.time()
    for step in bar:
        examples = training_examples(step, s, run.task_weights)
        batch = make_batch(tokenizer, examples, CANVAS_LENGTH)
        if s.hedged_targets:
            batch["hedge_reads"], batch["hedge_spread"] = hedge_tensors(examples, CANVAS_LENGTH, model.cfg.vocab_size)
        loss = training_loss(model, batch, s, generator)
        apply_update(model, run.optimizer, loss, learning_rate(step, s), s.grad_clip)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        entry = {"step": step + 1, "loss": loss.item(), "seconds": time.time() - began}
        if evaluate_fn is not None and (step + 1) % s.eval_every == 0:
            entry["eval"] = evaluate_in_eval_mode(model, evaluate_fn, tokenizer, step + 1)
            tqdm.write(f"step {step + 1}: {entry['eval']}")
        log.append(entry)
        if (step + 1) % s.save_every == 0 or step + 1 == s.steps:
            save_checkpoint(out, model, run.optimizer, step + 1, s, generator, log)
    return model.eval().requires_grad_(False)


def run_training_command(
    settings_class: type,
    train_fn: Callable[..., Any],
    evaluate_fn_of: Callable[[Any], Callable[..., Any]],
    command: tuple[list[str] | None, str, str, str],
) -> None:
    """Both toy trainers' command lines: `--out`, one flag per field of the settings dataclass (its
    defaults) and `--no-progress`, then `train_fn(out, settings, ...)` evaluating with
    `evaluate_fn_of(settings)`. `command`: (argv, prog, description, default --out)."""
    argv, prog, description, out = command
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--out", default=out)
    for setting_field in fields(settings_class):
        flag, default = f"--{setting_field.name.replace('_', '-')}", setting_field.default
        about = setting_field.metadata.get("help")
        if isinstance(default, bool):  # type=bool would read "False" as True
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=about)
        else:
            parser.add_argument(flag, type=type(default), default=default, help=about)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    settings = settings_class(**{k: getattr(args, k) for k in asdict(settings_class())})
    train_fn(args.out, settings, progress=not args.no_progress, evaluate_fn=evaluate_fn_of(settings))


def main(argv: list[str] | None = None, prog: str = "diffusionlens train-toy") -> None:
    from diffusionlens.toy.evaluate import quick_eval

    def evaluate_fn_of(settings: TrainSettings) -> Callable[..., Any]:
        return lambda m, t, step: quick_eval(m, t, n=settings.eval_examples, seed=step)

    command = (argv, prog, "Train the toy DiffusionGemma (resumes from --out).", "runs/toy")
    run_training_command(TrainSettings, train, evaluate_fn_of, command)


if __name__ == "__main__":
    main()
