"""How well a transcoder set stands in for the feed-forward blocks, denoising step by denoising step.

For each step s of a clean run (first canvas), over the rows still running at s:
- `fve[l]`: fraction of variance of layer l's `hook_ffn_out` the transcoder explains (1 - SSE / SST, the
  variance taken about the step's mean output), and `l0[l]`: features active per position;
- `loss`: the denoising loss of step s's prediction (cross-entropy against `targets`, pad targets left out, as
  `denoising_loss`), and `delta_loss_all` / `delta_loss_by_layer[l]`: its change when step s's decoder pass is
  re-run on the recorded input canvas and self-conditioning with every layer's (or only layer l's) transcoder
  spliced in;
- `exact_match`: the share of generated answers equal to `answers` when every layer is spliced at step s only
  (the run before s is the clean one, after s it goes its own way).
`exact_match_clean` and `exact_match_all_steps` (spliced at every step) frame them. Every run uses
`ReplayNoise`, so a difference is the transcoders' doing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Int

from diffusionlens.graphs.splicing import transcoder_hooks
from diffusionlens.graphs.transcoders import (
    TranscoderSet,
    transcoder_input_hook,
    transcoder_output_hook,
    transcoder_pair_hooks,
)
from diffusionlens.losses import denoising_loss
from diffusionlens.sampling.noise import ReplayNoise
from diffusionlens.sampling.recorded import encode_prompt, rerun_recorded_pass

if TYPE_CHECKING:
    from diffusionlens.model import HookedDiffusionGemma

SELF_COND_INPUT = "decoder.self_cond.hook_logits_in"


@dataclass
class StepQuality:
    """One denoising step's figures (see the module's docstring); lists are per layer."""

    step: int
    rows: int
    fve: list[float]
    l0: list[float]
    loss: float
    delta_loss_all: float
    delta_loss_by_layer: list[float]
    exact_match: float | None


@dataclass
class TranscoderQuality:
    """`steps[s]` for every step any row ran; exact match of the clean run and of one spliced at every step."""

    steps: list[StepQuality]
    prompts: int
    exact_match_clean: float | None
    exact_match_all_steps: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Sums:
    """Running sums for one (step, layer): squared errors, output sums and squares, active features, rows."""

    def __init__(self) -> None:
        self.sse, self.sum_sq, self.active, self.positions = 0.0, 0.0, 0.0, 0
        self.sum: torch.Tensor | None = None

    def add(self, target: torch.Tensor, prediction: torch.Tensor, acts: torch.Tensor) -> None:
        target, prediction = target.double().flatten(0, -2), prediction.double().flatten(0, -2)
        self.sse += float((target - prediction).pow(2).sum())
        self.sum_sq += float(target.pow(2).sum())
        total = target.sum(0)
        self.sum = total if self.sum is None else self.sum + total
        self.active += float((acts > 0).sum())
        self.positions += target.shape[0]

    def fve(self) -> float:
        variance = self.sum_sq - float(self.sum.pow(2).sum()) / self.positions
        return 1.0 - self.sse / variance

    def l0(self) -> float:
        return self.active / self.positions


@torch.no_grad()
def transcoder_quality(
    model: HookedDiffusionGemma,
    transcoders: TranscoderSet,
    input_ids: Int[torch.Tensor, "batch pos"],
    *,
    attention_mask: Int[torch.Tensor, "batch pos"] | None = None,
    targets: Int[torch.Tensor, "batch canvas"] | None = None,
    answers: Sequence[str] | None = None,
    decode: Callable[[list[int]], str] | None = None,
    batch_size: int = 50,
    seed: int = 12345,
    progress: bool = False,
    **generate_kwargs: Any,
) -> TranscoderQuality:
    """The quality table of `transcoders` on `model` over the prompts `input_ids` (see the module docstring).

    `targets` (`[batch, canvas]`, the clean answers' canvases) score the loss; without them the clean run's own
    final canvas is the target. `answers` turn on exact match, comparing `decode(canvas ids)` (default: the toy
    tokenizer's `decode_canvas`) with each answer. Prompts run `batch_size` at a time, chunk i with
    `ReplayNoise(seed + i * batch_size)`, as `toy.evaluate` does.
    """
    transcoders.check(model)
    if answers is not None and len(answers) != input_ids.shape[0]:
        raise ValueError(f"{len(answers)} answers for {input_ids.shape[0]} prompts; give one per prompt")
    if decode is None and answers is not None:
        from diffusionlens.toy.tokenizer import decode_canvas

        tokenizer = model.need_tokenizer()
        decode = functools.partial(decode_canvas, tokenizer)
    n_layers = len(transcoders)
    sums: dict[tuple[int, int], _Sums] = {}
    losses: dict[int, dict[str, float]] = {}
    chunk_exact: list[dict[Any, float]] = []
    rows_at: dict[int, int] = {}
    chunks = range(0, input_ids.shape[0], batch_size)
    for start in _progress(chunks, progress):
        chunk = slice(start, start + batch_size)
        kwargs = {
            "attention_mask": None if attention_mask is None else attention_mask[chunk],
            "noise": ReplayNoise(seed + start),
            "progress": False,
            **generate_kwargs,
        }
        result, cache = model.generate_with_cache(
            input_ids[chunk],
            names_filter=[*transcoder_pair_hooks(range(n_layers)), SELF_COND_INPUT],
            canvases=[0],
            **kwargs,
        )
        record = result.trace[0]
        stop = record.stop_step().to(model.device)
        goal = record.final.to(model.device) if targets is None else targets[chunk].to(model.device)
        state = encode_prompt(model, input_ids[chunk].to(model.device), kwargs["attention_mask"], None, 0)
        for step in range(record.n_steps):
            running = stop >= step
            rows_at[step] = rows_at.get(step, 0) + int(running.sum())
            for layer in range(n_layers):
                x = cache.get(transcoder_input_hook(layer), canvas=0, step=step)[running]
                y = cache.get(transcoder_output_hook(layer), canvas=0, step=step)[running]
                acts = transcoders[layer].encode(x.to(transcoders[layer].W_enc))
                sums.setdefault((step, layer), _Sums()).add(y, transcoders[layer].decode(acts), acts)
            self_cond = cache.get(SELF_COND_INPUT, canvas=0, step=step) if step > 0 else None
            _add_losses(model, transcoders, result.trace, state, self_cond, step, running, goal, losses)
        if answers is not None:
            chunk_exact.append(
                _chunk_matches(model, transcoders, input_ids[chunk], result, list(answers[chunk]), decode, kwargs)
            )
    n = input_ids.shape[0]
    # A chunk whose runs all stopped before step s is not touched by a splice at s: its clean answers count.
    exact = {
        key: sum(matches.get(key, matches["clean"]) for matches in chunk_exact) for key in ["clean", "all", *rows_at]
    }
    steps = [
        StepQuality(
            step=step,
            rows=rows_at[step],
            fve=[sums[step, layer].fve() for layer in range(n_layers)],
            l0=[sums[step, layer].l0() for layer in range(n_layers)],
            loss=losses[step]["clean"] / losses[step]["count"],
            delta_loss_all=(losses[step]["all"] - losses[step]["clean"]) / losses[step]["count"],
            delta_loss_by_layer=[
                (losses[step][layer] - losses[step]["clean"]) / losses[step]["count"] for layer in range(n_layers)
            ],
            exact_match=exact[step] / n if answers is not None else None,
        )
        for step in sorted(rows_at)
    ]
    return TranscoderQuality(
        steps=steps,
        prompts=n,
        exact_match_clean=exact["clean"] / n if answers is not None else None,
        exact_match_all_steps=exact["all"] / n if answers is not None else None,
    )


def _progress(chunks: range, progress: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(chunks, desc="transcoder quality", unit="batch", disable=not progress)


def _add_losses(
    model: HookedDiffusionGemma,
    transcoders: TranscoderSet,
    trace: Any,
    state: Any,
    self_cond: torch.Tensor | None,
    step: int,
    running: torch.Tensor,
    goal: torch.Tensor,
    losses: dict[int, dict[str, float]],
) -> None:
    """Sum over the running rows' counted positions of step `step`'s cross-entropy, re-run clean, with every
    layer spliced and with each layer alone spliced."""
    mask = running[:, None] & (goal != model.cfg.pad_token_id)
    count = int(mask.sum())
    totals = losses.setdefault(step, {"count": 0.0})
    totals["count"] += count
    if count == 0:
        return
    ctx = model.hook_ctx
    try:
        for key, layers in [("clean", []), ("all", None), *[(layer, [layer]) for layer in range(len(transcoders))]]:
            hooks = [] if key == "clean" else transcoder_hooks(transcoders, layers=layers)
            with model.hooks(fwd_hooks=hooks):
                logits = rerun_recorded_pass(model, trace, state, self_cond, canvas=0, step=step)
            loss = denoising_loss(logits, goal, loss_mask=mask)
            totals[key] = totals.get(key, 0.0) + float(loss) * count
    finally:
        ctx.reset()


def _chunk_matches(
    model: HookedDiffusionGemma,
    transcoders: TranscoderSet,
    input_ids: torch.Tensor,
    clean: Any,
    answers: list[str],
    decode: Callable[[list[int]], str],
    kwargs: dict[str, Any],
) -> dict[Any, float]:
    """Correct answers of one chunk: clean, with every layer spliced at each step the clean run reached, and
    spliced at every step ("all")."""
    matches = {"clean": _matches(clean, input_ids.shape[1], answers, decode)}
    for where in [*range(clean.trace[0].n_steps), "all"]:
        hooks = transcoder_hooks(transcoders, steps=None if where == "all" else [where])
        spliced = model.generate(input_ids, fwd_hooks=hooks, **kwargs)
        matches[where] = _matches(spliced, input_ids.shape[1], answers, decode)
    return matches


def _matches(result: Any, prompt_length: int, answers: list[str], decode: Callable[[list[int]], str]) -> float:
    canvas = result.sequences[:, prompt_length:]
    return float(sum(decode(canvas[row].tolist()) == answer for row, answer in enumerate(answers)))


def toy_quality(
    model: HookedDiffusionGemma,
    transcoders: TranscoderSet,
    *,
    n: int = 200,
    seed: int = 12345,
    batch_size: int = 50,
    progress: bool = False,
) -> TranscoderQuality:
    """`transcoder_quality` on `n` held-out toy prompts of every task (`toy.evaluate`'s prompts and noise)."""
    from diffusionlens.toy.data import make_batch
    from diffusionlens.toy.tasks import make_dataset
    from diffusionlens.toy.tokenizer import CANVAS_LENGTH

    examples = make_dataset(None, n, seed=seed, split="eval").examples
    batch = make_batch(model.need_tokenizer(), examples, CANVAS_LENGTH)
    return transcoder_quality(
        model,
        transcoders,
        batch["input_ids"],
        attention_mask=batch["attention_mask"],
        targets=batch["canvas_ids"],
        answers=[example.answer for example in examples],
        batch_size=batch_size,
        seed=seed,
        progress=progress,
        max_new_tokens=CANVAS_LENGTH,
    )


def format_quality(quality: TranscoderQuality) -> str:
    """A markdown table, one row per step, and the exact-match frame under it."""

    def per_layer(values: list[float], digits: int) -> str:
        return " / ".join(f"{v:.{digits}f}" for v in values)

    has_exact = quality.exact_match_clean is not None
    lines = [
        "| step | rows | FVE mean | FVE per layer | L0 per layer | loss | Δloss all layers | Δloss per layer"
        + (" | exact match, spliced at this step |" if has_exact else " |"),
        "|---|---|---|---|---|---|---|---" + ("|---|" if has_exact else "|"),
    ]
    for row in quality.steps:
        cells = [
            str(row.step),
            str(row.rows),
            f"{sum(row.fve) / len(row.fve):.3f}",
            per_layer(row.fve, 3),
            per_layer(row.l0, 1),
            f"{row.loss:.4f}",
            f"{row.delta_loss_all:+.4f}",
            per_layer(row.delta_loss_by_layer, 4),
        ]
        if has_exact:
            cells.append(f"{row.exact_match:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    if has_exact:
        lines.append("")
        lines.append(
            f"Exact match over {quality.prompts} prompts: clean {quality.exact_match_clean:.3f}, "
            f"transcoders spliced at every step {quality.exact_match_all_steps:.3f}."
        )
    return "\n".join(lines)
