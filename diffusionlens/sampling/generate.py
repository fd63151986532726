"""Block-diffusion generation, written on our model, with hooks at every denoising step.

The loop is the reference's (transformers' `DiffusionGemmaGenerationMixin.generate`): per canvas,
encode what is new, start from uniform random tokens, then for up to N steps run the decoder,
scale by the temperature schedule, sample, accept the lowest-entropy tokens within the entropy
bound, renoise the rest, and stop rows that are stable and confident. The previous step's scaled
logits are the next step's self-conditioning input. Finished canvases are appended and encoded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float, Int
from tqdm.auto import tqdm

from diffusionlens.sampling.noise import NoiseSource, TorchRNGNoise
from diffusionlens.sampling.sampler import (
    StableAndConfident,
    entropy,
    entropy_bound_acceptance,
    temperature,
)
from diffusionlens.sampling.settings import NOT_GIVEN, GenerationSettings, merge_settings
from diffusionlens.tokens import checked_attention_mask
from diffusionlens.trace import CanvasTrace, DenoisingTrace
from diffusionlens.weights.fingerprint import model_fingerprint

if TYPE_CHECKING:
    from pathlib import Path

    from diffusionlens.cache.denoising import DenoisingCache, RecordSpec
    from diffusionlens.hooks.points import NameFilter
    from diffusionlens.indexing import Selector
    from diffusionlens.model import HookedDiffusionGemma


@dataclass
class GenerationResult:
    """sequences: prompt followed by every generated canvas, as transformers' `generate(...).sequences`
    (tokens after a row's eos, and whole canvases after it, are pad). trace: the sampler's record."""

    sequences: Int[torch.Tensor, "batch length"]
    trace: DenoisingTrace
    tokens_per_forward: Float[torch.Tensor, " batch"]

    def new_tokens(self) -> Int[torch.Tensor, "batch generated"]:
        return self.sequences[:, self.trace.prompt_length :]


@dataclass
class ForkState:
    """Where a generation resumes: the first canvas at the start of step `step`, as an earlier run
    left it. With `ReplayNoise` every draw depends only on (canvas, step), so a run resumed here and
    patched from `step` on is the run that was patched from `step` on, without re-running steps
    0 … step-1 (see `diffusionlens.patching.runs.fork_state`, which builds one from a recorded run).

    canvas: the canvas step `step` reads; self_cond: the self-conditioning logits it reads (None at
    step 0); argmax_canvas: the last draft (the canvas itself at step 0); finished: rows already
    stopped; stop_history: the stopping rule's last `stability_threshold` drafts (None at step 0);
    forward_passes: decoder passes each row has had; prompt_state: the encoded prompt; trace_prefix:
    the trace's rows for steps before `step` (each field a list of per-step tensors). input_ids,
    attention_mask (bool, on the CPU) and run_settings (`run_settings(...)` of the forked run): what
    `generate` checks a resumed call against, refusing another prompt, batch or setting.
    """

    step: int
    canvas: Int[torch.Tensor, "batch canvas"]
    self_cond: Float[torch.Tensor, "batch canvas vocab"] | None
    argmax_canvas: Int[torch.Tensor, "batch canvas"]
    finished: Bool[torch.Tensor, " batch"]
    stop_history: Int[torch.Tensor, "threshold batch canvas"] | None
    forward_passes: Int[torch.Tensor, " batch"]
    prompt_state: Any
    trace_prefix: dict[str, list[torch.Tensor]]
    input_ids: Int[torch.Tensor, "batch pos"]
    attention_mask: Bool[torch.Tensor, "batch pos"]
    run_settings: dict[str, Any]


def run_settings(
    model: HookedDiffusionGemma,
    settings: GenerationSettings,
    noise: NoiseSource,
    self_cond_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Everything besides the prompt that decides a generation's steps: every setting (eos and pad
    resolved against the config), the noise source and the self-conditioning transform."""
    values = {f.name: getattr(settings, f.name) for f in fields(GenerationSettings)}
    values["eos_token_id"], values["pad_token_id"] = list(settings.eos_ids(model.cfg)), settings.pad_id(model.cfg)
    values["noise"] = repr(noise)
    values["self_cond_transform"] = None if self_cond_transform is None else repr(self_cond_transform)
    return values


def check_resume(
    resume: ForkState,
    input_ids: Int[torch.Tensor, "batch pos"],
    attention_mask: Bool[torch.Tensor, "batch pos"],
    settings: dict[str, Any],
) -> None:
    """Refuse to resume `resume` in a call whose prompt, mask or settings differ from the forked run's:
    its steps so far were computed from those, so the answer would belong to another run."""
    if not isinstance(resume, ForkState):
        raise TypeError(f"resume must be a ForkState (from patching.runs.fork_state), got {type(resume).__name__}")
    fix = (
        "resume a ForkState only with the input_ids, attention_mask, settings and noise of the run it was "
        "forked from (run_patched(..., fork_at=step) does this)"
    )
    forked_ids = resume.input_ids
    if tuple(forked_ids.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"resume= was forked from a run with input_ids of shape {tuple(forked_ids.shape)} [batch, pos], but "
            f"this call's are {tuple(input_ids.shape)}; {fix}"
        )
    if not torch.equal(forked_ids.cpu(), input_ids.cpu()):
        rows = (forked_ids.cpu() != input_ids.cpu()).any(-1).nonzero().flatten().tolist()
        raise ValueError(f"resume= was forked from a run with another prompt (rows {rows} differ); {fix}")
    if not torch.equal(resume.attention_mask.cpu(), attention_mask.cpu()):
        raise ValueError(f"resume= was forked from a run with another attention_mask; {fix}")
    changed = {k: (resume.run_settings.get(k), v) for k, v in settings.items() if resume.run_settings.get(k) != v}
    if changed:
        described = ", ".join(f"{k}: forked run {old!r}, this call {new!r}" for k, (old, new) in changed.items())
        raise ValueError(f"resume= was forked from a run with other settings ({described}); {fix}")


def _grad_needed(model: HookedDiffusionGemma) -> bool:
    return any(point.thread_hooks("bwd") for point in model.hook_dict.values())


def generate(
    model: HookedDiffusionGemma,
    input_ids: Int[torch.Tensor, "batch pos"],
    *,
    settings: GenerationSettings | None = None,
    max_new_tokens: int | None = None,
    max_denoising_steps: int | None = None,
    entropy_bound: float | None = None,
    t_min: float | None = None,
    t_max: float | None = None,
    stability_threshold: int | None = None,
    confidence_threshold: float | None = None,
    eos_token_id: int | Iterable[int] | None = NOT_GIVEN,
    pad_token_id: int | None = NOT_GIVEN,
    record_top_k: int | None = None,
    attention_mask: Bool[torch.Tensor, "batch pos"] | Int[torch.Tensor, "batch pos"] | None = None,
    noise: NoiseSource | None = None,
    fwd_hooks: Iterable[tuple[Any, Callable]] = (),
    bwd_hooks: Iterable[tuple[Any, Callable]] = (),
    progress: bool = True,
    self_cond_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    bottleneck: Callable[[torch.Tensor], torch.Tensor] | None = None,
    cache: DenoisingCache | None = None,
    resume: ForkState | None = None,
) -> GenerationResult:
    """Generate with DiffusionGemma's block-diffusion sampler; hooks fire at every step.

    Sampler settings come from `settings` (a `GenerationSettings`; default `GenerationSettings()`:
    max_new_tokens=256, max_denoising_steps=48, entropy_bound=0.1, t_min=0.4, t_max=0.8,
    stability_threshold=1, confidence_threshold=0.005, record_top_k=0, eos/pad from the model
    config). Each settings keyword given here overrides that field of `settings`; a keyword left at
    its default (None, or NOT_GIVEN for eos/pad, where None means "disable") keeps it.

    With the default `noise=TorchRNGNoise()`, `torch.manual_seed(s)` followed by this call gives the
    same `.sequences` as `torch.manual_seed(s)` followed by transformers' `generate` with the same
    settings. `bottleneck` (e.g. `TokenBottleneck(top_k=4)`) or any `self_cond_transform` rewrites the
    self-conditioning logits between steps. `cache` (see `generate_with_cache`) records hook values
    with the step axis. `resume` (a `ForkState`) continues the first canvas from a recorded step
    instead of encoding the prompt and running the steps before it.
    """
    settings = merge_settings(settings, **_settings_keywords(locals()))
    noise = noise if noise is not None else TorchRNGNoise()
    if bottleneck is not None and self_cond_transform is not None:
        raise ValueError("pass either bottleneck or self_cond_transform, not both")
    self_cond_transform = bottleneck or self_cond_transform
    input_ids = model.check_tokens(input_ids, "input_ids")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty: give at least one prompt token (e.g. bos)")
    attention_mask = checked_attention_mask(attention_mask, input_ids)
    if resume is not None:
        check_resume(resume, input_ids, attention_mask, run_settings(model, settings, noise, self_cond_transform))
    hooks = list(fwd_hooks)
    if cache is not None:
        hooks += cache.recording_hooks(model)
    completed = False
    try:
        with model.hooks_for_run(fwd_hooks=hooks, bwd_hooks=bwd_hooks):
            context = torch.enable_grad() if _grad_needed(model) else torch.inference_mode()
            with context:
                run = _Run(settings, noise, progress, self_cond_transform, cache, resume)
                result = _generate(model, input_ids, attention_mask, run)
        completed = True
        return result
    finally:
        model.hook_ctx.reset()
        if cache is not None:
            cache.finish(complete=completed)


def _settings_keywords(scope: dict[str, Any]) -> dict[str, Any]:
    """The settings keywords of `generate`'s (or `generate_with_cache`'s) signature, read from its locals."""
    return {f.name: scope[f.name] for f in fields(GenerationSettings)}


@dataclass(frozen=True)
class _Run:
    """What one generation runs with, besides the model and its inputs."""

    settings: GenerationSettings
    noise: NoiseSource
    progress: bool
    self_cond_transform: Callable[[torch.Tensor], torch.Tensor] | None
    cache: DenoisingCache | None
    resume: ForkState | None = None


def _generate(
    model: HookedDiffusionGemma, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, run: _Run
) -> GenerationResult:
    cfg, ctx = model.cfg, model.hook_ctx
    settings, noise, cache = run.settings, run.noise, run.cache
    self_cond_transform, record_top_k = run.self_cond_transform, settings.record_top_k
    eos_ids, pad_id = settings.eos_ids(cfg), settings.pad_id(cfg)
    max_new_tokens = settings.max_new_tokens
    device = input_ids.device
    batch, prompt_len = input_ids.shape
    length, vocab = cfg.canvas_length, cfg.vocab_size
    n_canvases = math.ceil(max_new_tokens / length)
    max_length = prompt_len + max_new_tokens
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    attention_mask = attention_mask.to(device=device, dtype=torch.bool)
    eos_tensor = torch.tensor(eos_ids, device=device) if eos_ids else None
    sequences = input_ids
    finished_rows = torch.zeros(batch, dtype=torch.bool, device=device)
    forward_passes = torch.zeros(batch, dtype=torch.int, device=device)
    traces: list[CanvasTrace] = []
    state = None
    new_tokens, new_mask = input_ids, attention_mask
    bar = tqdm(total=n_canvases * settings.max_denoising_steps, desc="denoising", disable=not run.progress, leave=False)
    try:
        for canvas_index in range(n_canvases):
            ctx.canvas, ctx.step, ctx.t = canvas_index, None, None
            fork = run.resume if canvas_index == 0 else None
            state = fork.prompt_state if fork is not None else model.encode(new_tokens, new_mask, state)
            if cache is not None:
                cache.end_encoder(canvas_index)
            stopper = StableAndConfident(settings.stability_threshold, settings.confidence_threshold)
            record: dict[str, list[torch.Tensor]] = {f.name: [] for f in fields(CanvasTrace)}
            first_step = 0
            if fork is None:
                canvas = noise.initial_canvas(batch, length, vocab, device, canvas_index)
                argmax_canvas = canvas
                self_cond = None
                finished = torch.zeros(batch, dtype=torch.bool, device=device)
            else:
                first_step, canvas, self_cond = fork.step, fork.canvas.to(device), fork.self_cond
                argmax_canvas, finished = fork.argmax_canvas.to(device), fork.finished.to(device)
                stopper.history = None if fork.stop_history is None else fork.stop_history.to(device).clone()
                forward_passes += fork.forward_passes.to(device)
                record.update({name: list(rows) for name, rows in fork.trace_prefix.items()})
                bar.update(first_step)
            for step, t in enumerate(reversed(range(1, settings.max_denoising_steps + 1))):
                if step < first_step:
                    continue
                forward_passes += ~(finished | finished_rows)
                out = denoising_step(
                    model,
                    settings,
                    noise,
                    canvas_index,
                    step,
                    t,
                    canvas,
                    state,
                    self_cond,
                    argmax_canvas,
                    finished,
                    stopper,
                )
                logits, new_argmax, finished = out.logits, out.argmax, out.finished
                _append(
                    record,
                    canvas,
                    out.sampled,
                    new_argmax,
                    out.entropy,
                    out.accepted,
                    out.next_canvas,
                    finished,
                    out.temperature,
                    t,
                )
                if record_top_k:
                    top = torch.topk(out.probs, k=min(record_top_k, vocab), dim=-1)
                    record["top_k_tokens"].append(top.indices.cpu())
                    record["top_k_probs"].append(top.values.cpu())
                if cache is not None:
                    cache.end_step(canvas_index, step)
                self_cond = logits.to(model.dtype)
                if self_cond_transform is not None:
                    self_cond = self_cond_transform(self_cond)
                canvas, argmax_canvas = out.next_canvas, new_argmax
                bar.update(1)
                if bool(finished.all()):
                    break
            bar.update(settings.max_denoising_steps - 1 - step)
            traces.append(_canvas_trace(record))
            sequences = torch.cat([sequences, argmax_canvas], dim=-1)
            sequences, finished_rows = _finalize_canvas(
                sequences, finished_rows, max_length, length, eos_tensor, pad_id
            )
            if bool(finished_rows.all()):
                break
            new_tokens = sequences[:, -length:]
            new_mask = torch.ones_like(new_tokens, dtype=torch.bool)
    finally:
        bar.close()
    new = sequences[:, prompt_len:]
    valid = (new != pad_id).sum(-1) if pad_id is not None else torch.full((batch,), new.shape[1], device=device)
    settings_record = _settings_dict(settings, noise, eos_ids, pad_id)
    trace = DenoisingTrace(traces, prompt_len, settings_record, model_fingerprint(model))
    return GenerationResult(sequences, trace, valid / forward_passes)


@dataclass
class StepOutput:
    """What one denoising step computed. logits: the temperature-scaled logits after
    `sampler.hook_logits` (the previous step's for rows that had stopped: the next step's
    self-conditioning input); entropy: after `sampler.hook_entropy`; next_canvas: after
    `sampler.hook_canvas_next`; finished: rows stopped after this step."""

    raw: Float[torch.Tensor, "batch canvas vocab"]
    logits: Float[torch.Tensor, "batch canvas vocab"]
    probs: Float[torch.Tensor, "batch canvas vocab"]
    sampled: Int[torch.Tensor, "batch canvas"]
    argmax: Int[torch.Tensor, "batch canvas"]
    entropy: Float[torch.Tensor, "batch canvas"]
    accepted: Bool[torch.Tensor, "batch canvas"]
    next_canvas: Int[torch.Tensor, "batch canvas"]
    finished: Bool[torch.Tensor, " batch"]
    temperature: Float[torch.Tensor, ""]


def denoising_step(
    model: HookedDiffusionGemma,
    settings: GenerationSettings,
    noise: NoiseSource,
    canvas_index: int,
    step: int,
    t: int,
    canvas: Int[torch.Tensor, "batch canvas"],
    state: Any,
    self_cond: Float[torch.Tensor, "batch canvas vocab"] | None,
    argmax_canvas: Int[torch.Tensor, "batch canvas"],
    finished: Bool[torch.Tensor, " batch"],
    stopper: StableAndConfident,
) -> StepOutput:
    """One step of the sampler, as the reference runs it: decoder pass, temperature, sample, accept the
    lowest-entropy tokens within the bound, renoise the rest, stop rows that are stable and confident.
    Every operation is row by row except the noise draws, which `noise` makes for the whole batch.
    Rows already `finished` keep their canvas, draft and self-conditioning logits."""
    hooks, ctx = model.sampler, model.hook_ctx
    ctx.step, ctx.t = step, t
    batch, length = canvas.shape
    device, vocab = canvas.device, model.cfg.vocab_size
    raw = model.denoise(canvas, state, self_cond)
    temp = temperature(t, settings, device)
    logits = hooks.hook_logits(raw / temp)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    sampled = hooks.hook_sampled(noise.sample(probs, canvas_index, step))
    new_argmax = hooks.hook_argmax(torch.argmax(logits, dim=-1))
    raw_entropy = entropy(logits)
    token_entropy = hooks.hook_entropy(raw_entropy)
    accepted = hooks.hook_accepted(entropy_bound_acceptance(token_entropy, settings.entropy_bound))
    kept = torch.where(accepted, sampled, canvas)
    fresh = noise.renoise(batch, length, vocab, device, canvas_index, step)
    next_canvas = torch.where(~accepted, fresh, kept)
    if finished.any():
        new_argmax = torch.where(finished[:, None], argmax_canvas, new_argmax)
        next_canvas = torch.where(finished[:, None], canvas, next_canvas)
        logits = torch.where(finished[:, None, None], self_cond, logits)
    next_canvas = hooks.hook_canvas_next(next_canvas)
    # The reference recomputes this entropy inside its stopping rule; rows whose logits were
    # swapped above are finished already, so reusing it changes no decision.
    finished = finished | stopper(new_argmax, raw_entropy)
    return StepOutput(raw, logits, probs, sampled, new_argmax, token_entropy, accepted, next_canvas, finished, temp)


def _append(record, canvas, sampled, argmax, token_entropy, accepted, next_canvas, finished, temp, t) -> None:
    values = {
        "input_canvas": canvas,
        "sampled": sampled,
        "argmax": argmax,
        "entropy": token_entropy,
        "accepted": accepted,
        "next_canvas": next_canvas,
        "finished": finished,
        "temperature": temp.reshape(()),
    }
    for key, value in values.items():
        record[key].append(value.detach().cpu())
    record["t"].append(torch.tensor(t))


def _canvas_trace(record: dict[str, list[torch.Tensor]]) -> CanvasTrace:
    stacked = {k: torch.stack(v) for k, v in record.items() if v}
    return CanvasTrace(**stacked)


def _finalize_canvas(
    sequences: torch.Tensor,
    finished_rows: torch.Tensor,
    max_length: int,
    length: int,
    eos_tensor: torch.Tensor | None,
    pad_id: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stop rows at max length or on eos; pad what follows eos and every canvas after a stop."""
    done_now = torch.full_like(finished_rows, sequences.shape[1] >= max_length)
    if eos_tensor is not None:
        done_now = done_now | torch.isin(sequences[:, -length:], eos_tensor).any(dim=-1)
    previously = finished_rows
    finished_rows = previously | done_now
    if pad_id is not None and bool(finished_rows.any()):
        sequences[previously, -length:] = pad_id
        if eos_tensor is not None and bool(done_now.any()):
            new = sequences[:, -length:]
            is_eos = torch.isin(new, eos_tensor)
            eos_count = is_eos.cumsum(dim=-1)
            new[(eos_count > 0) & ~((eos_count == 1) & is_eos)] = pad_id
    return sequences, finished_rows


def _settings_dict(
    settings: GenerationSettings, noise: NoiseSource, eos_ids: tuple[int, ...], pad_id: int | None
) -> dict:
    return {**settings.sampler_dict(), "noise": repr(noise), "eos_token_id": list(eos_ids), "pad_token_id": pad_id}


def generate_with_cache(
    model: HookedDiffusionGemma,
    input_ids: Int[torch.Tensor, "batch pos"],
    *,
    record: RecordSpec | None = None,
    names_filter: NameFilter = None,
    steps: Selector = None,
    positions: Selector = None,
    canvases: Selector = None,
    dtype: torch.dtype | None = None,
    storage: str | None = None,
    path: str | Path | None = None,
    overwrite: bool | None = None,
    max_bytes: int | None = None,
    settings: GenerationSettings | None = None,
    max_new_tokens: int | None = None,
    max_denoising_steps: int | None = None,
    entropy_bound: float | None = None,
    t_min: float | None = None,
    t_max: float | None = None,
    stability_threshold: int | None = None,
    confidence_threshold: float | None = None,
    eos_token_id: int | Iterable[int] | None = NOT_GIVEN,
    pad_token_id: int | None = NOT_GIVEN,
    record_top_k: int | None = None,
    attention_mask: Bool[torch.Tensor, "batch pos"] | Int[torch.Tensor, "batch pos"] | None = None,
    noise: NoiseSource | None = None,
    fwd_hooks: Iterable[tuple[Any, Callable]] = (),
    bwd_hooks: Iterable[tuple[Any, Callable]] = (),
    progress: bool = True,
    self_cond_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    bottleneck: Callable[[torch.Tensor], torch.Tensor] | None = None,
    resume: ForkState | None = None,
) -> tuple[GenerationResult, DenoisingCache]:
    """`generate`, recording the hooks matched by `names_filter` into a step-indexed DenoisingCache.

    What is recorded comes from `record` (a `RecordSpec`; default `RecordSpec()`: every hook, every
    step, position and canvas, in memory), each record keyword given here overriding its field, as the
    settings keywords override `settings` (see `generate`, which takes the other arguments).
    Filters apply at record time: `names_filter` (names, globs, regexes or a predicate; one that
    matches nothing raises a KeyError naming the nearest hooks), `steps` (denoising steps within each
    canvas), `positions` (canvas positions of decoder and sampler hooks), `canvases`; `dtype`
    converts floating values. `storage`: "memory" (where computed), "cpu", or "disk" (safetensors
    shards under `path`, written as the run goes, with a manifest and a completion marker that
    `DenoisingCache.load` checks). `path` must be a new or empty directory: one that holds another
    cache or any file is refused before the run unless `overwrite=True`. `max_bytes` refuses before
    the run, with the estimate, if the request would not fit.
    """
    from diffusionlens.cache.denoising import RecordSpec, build_cache

    record = RecordSpec.merged(
        record,
        names_filter=names_filter,
        steps=steps,
        positions=positions,
        canvases=canvases,
        dtype=dtype,
        storage=storage,
        path=path,
        overwrite=overwrite,
        max_bytes=max_bytes,
    )
    settings = merge_settings(settings, **_settings_keywords(locals()))
    input_ids = model.check_tokens(input_ids, "input_ids")
    # Checked here too, not only in `generate`: the cache may create its directory before that runs.
    mask = checked_attention_mask(attention_mask, input_ids)
    if resume is not None:
        transform = bottleneck or self_cond_transform
        used_noise = noise if noise is not None else TorchRNGNoise()
        check_resume(resume, input_ids, mask, run_settings(model, settings, used_noise, transform))
    cache = build_cache(
        model,
        record,
        batch=input_ids.shape[0],
        prompt_len=input_ids.shape[1],
        max_steps=settings.max_denoising_steps,
        n_canvases=math.ceil(settings.max_new_tokens / model.cfg.canvas_length),
    )
    result = generate(
        model,
        input_ids,
        settings=settings,
        attention_mask=attention_mask,
        noise=noise,
        fwd_hooks=fwd_hooks,
        bwd_hooks=bwd_hooks,
        progress=progress,
        self_cond_transform=self_cond_transform,
        bottleneck=bottleneck,
        cache=cache,
        resume=resume,
    )
    return result, cache
