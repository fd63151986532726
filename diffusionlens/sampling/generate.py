"""Block-diffusion generation, written on our model, with hooks at every denoising step.

The loop is the reference's (transformers' `DiffusionGemmaGenerationMixin.generate`), written once in
`diffusionlens.sampling.loop` (one generation is one lane of it) with the step itself in
`diffusionlens.sampling.step`. This module is the public entry: `generate` and `generate_with_cache`
build their arguments once into a `GenerationCall` (settings into one `GenerationSettings`, what to
record into one `RecordSpec`) and run it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float, Int

from diffusionlens.sampling.loop import DenoisingLoop, Lane, LoopRun, trace_settings
from diffusionlens.sampling.noise import NoiseSource, TorchRNGNoise
from diffusionlens.sampling.settings import GenerationSettings, merge_settings
from diffusionlens.sampling.step import SelfCondTransform
from diffusionlens.sampling.trace import DenoisingTrace
from diffusionlens.tokens import checked_attention_mask
from diffusionlens.weights.fingerprint import model_fingerprint

if TYPE_CHECKING:
    from diffusionlens.cache.denoising import DenoisingCache, RecordSpec
    from diffusionlens.model import HookedDiffusionGemma

Hooks = Iterable[tuple[Any, Callable]]


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
    self_cond_transform: SelfCondTransform | None = None,
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


def chosen_self_cond_transform(
    bottleneck: SelfCondTransform | None, self_cond_transform: SelfCondTransform | None
) -> SelfCondTransform | None:
    """The self-conditioning transform of a call given `bottleneck=` or `self_cond_transform=` (one name
    for one thing: a bottleneck is a transform), refusing both."""
    if bottleneck is not None and self_cond_transform is not None:
        raise ValueError("pass either bottleneck or self_cond_transform, not both")
    return bottleneck or self_cond_transform


@dataclass(frozen=True)
class GenerationCall:
    """One generation's inputs: the prompt and its mask, the settings, the noise source, the
    self-conditioning transform, hooks, whether to show progress, and the `ForkState` it resumes from
    (if any). `generate` builds one from its parameters, `from_keywords` from the same keywords in a
    dict; `checked` checks it against the model once, before the run."""

    input_ids: Int[torch.Tensor, "batch pos"]
    settings: GenerationSettings
    attention_mask: Bool[torch.Tensor, "batch pos"] | Int[torch.Tensor, "batch pos"] | None = None
    noise: NoiseSource | None = None
    self_cond_transform: SelfCondTransform | None = None
    fwd_hooks: Hooks = ()
    bwd_hooks: Hooks = ()
    progress: bool = True
    resume: ForkState | None = None

    @classmethod
    def from_keywords(
        cls,
        input_ids: Int[torch.Tensor, "batch pos"],
        settings: GenerationSettings | None = None,
        bottleneck: SelfCondTransform | None = None,
        **keywords: Any,
    ) -> GenerationCall:
        """`generate`'s keywords as a dict (what `generate_with_cache` forwards): those naming a field of
        the call go there, `bottleneck` is the self-conditioning transform, every other keyword is a
        settings keyword merged into `settings`."""
        names = {f.name for f in fields(cls)}
        options = {k: v for k, v in keywords.items() if k in names}
        settings = merge_settings(settings, **{k: v for k, v in keywords.items() if k not in names})
        transform = chosen_self_cond_transform(bottleneck, options.pop("self_cond_transform", None))
        return cls(input_ids, settings, self_cond_transform=transform, **options)

    def checked(self, model: HookedDiffusionGemma) -> GenerationCall:
        """This call with the prompt checked, the mask made boolean, the default noise filled in and the
        resumed state (if any) checked against it."""
        noise = self.noise if self.noise is not None else TorchRNGNoise()
        input_ids = model.check_tokens(self.input_ids, "input_ids")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids is empty: give at least one prompt token (e.g. bos)")
        mask = checked_attention_mask(self.attention_mask, input_ids)
        if self.resume is not None:
            forked_settings = run_settings(model, self.settings, noise, self.self_cond_transform)
            check_resume(self.resume, input_ids, mask, forked_settings)
        hooks = {"fwd_hooks": tuple(self.fwd_hooks), "bwd_hooks": tuple(self.bwd_hooks)}
        return replace(self, input_ids=input_ids, attention_mask=mask, noise=noise, **hooks)


def generate(
    model: HookedDiffusionGemma,
    input_ids: Int[torch.Tensor, "batch pos"],
    *,
    settings: GenerationSettings | None = None,
    attention_mask: Bool[torch.Tensor, "batch pos"] | Int[torch.Tensor, "batch pos"] | None = None,
    noise: NoiseSource | None = None,
    fwd_hooks: Hooks = (),
    bwd_hooks: Hooks = (),
    self_cond_transform: SelfCondTransform | None = None,
    bottleneck: SelfCondTransform | None = None,
    progress: bool = True,
    resume: ForkState | None = None,
    **settings_keywords: Any,
) -> GenerationResult:
    """Generate with DiffusionGemma's block-diffusion sampler; hooks fire at every step.

    Sampler settings come from `settings` (a `GenerationSettings`; default `GenerationSettings()`:
    max_new_tokens=256, max_denoising_steps=48, entropy_bound=0.1, t_min=0.4, t_max=0.8,
    stability_threshold=1, confidence_threshold=0.005, record_top_k=0, eos/pad from the model
    config). `settings_keywords` are sugar: any `GenerationSettings` field given as a keyword
    (`max_denoising_steps=6`) overrides that field of `settings`; None keeps it, except for
    `eos_token_id=None` / `pad_token_id=None`, which disable eos stopping / padding.

    With the default `noise=TorchRNGNoise()`, `torch.manual_seed(s)` followed by this call gives the
    same `.sequences` as `torch.manual_seed(s)` followed by transformers' `generate` with the same
    settings. `bottleneck` (e.g. `TokenBottleneck(top_k=4)`) or any `self_cond_transform` rewrites the
    self-conditioning logits between steps. `resume` (a `ForkState`) continues the first canvas from a
    recorded step instead of encoding the prompt and running the steps before it. To record hook
    values with the step axis, call `generate_with_cache`.
    """
    settings = merge_settings(settings, **settings_keywords)
    transform = chosen_self_cond_transform(bottleneck, self_cond_transform)
    options = (attention_mask, noise, transform, fwd_hooks, bwd_hooks, progress, resume)
    call = GenerationCall(input_ids, settings, *options).checked(model)
    return run_generation(model, call)


def generate_with_cache(
    model: HookedDiffusionGemma,
    input_ids: Int[torch.Tensor, "batch pos"],
    *,
    record: RecordSpec | None = None,
    **options: Any,
) -> tuple[GenerationResult, DenoisingCache]:
    """`generate`, recording hook values into a step-indexed DenoisingCache: the one way to ask for
    a cache during generation.

    What is recorded comes from `record` (a `RecordSpec`; default `RecordSpec()`: every hook, every
    step, position and canvas, in memory). Any `RecordSpec` field given as a keyword (`names_filter`,
    `steps`, `positions`, `canvases`, `dtype`, `storage`, `path`, `overwrite`, `max_bytes`) overrides
    that field of `record`, as settings keywords override `settings`; every other keyword is
    `generate`'s. Filters apply at record time: `names_filter` (names, globs, regexes or a predicate;
    one that matches nothing raises a KeyError naming the nearest hooks), `steps` (denoising steps
    within each canvas), `positions` (canvas positions of decoder and sampler hooks), `canvases`;
    `dtype` converts floating values. `storage`: "memory" (where computed), "cpu", or "disk"
    (safetensors shards under `path`, written as the run goes, with a manifest and a completion
    marker that `DenoisingCache.load` checks). `path` must be a new or empty directory: one that
    holds another cache or any file is refused before the run unless `overwrite=True`. `max_bytes`
    refuses before the run, with the estimate, if the request would not fit.
    """
    from diffusionlens.cache.denoising import RecordSpec, build_cache

    record_names = {f.name for f in fields(RecordSpec)}
    record = RecordSpec.merged(record, **{k: v for k, v in options.items() if k in record_names})
    generate_options = {k: v for k, v in options.items() if k not in record_names}
    call = GenerationCall.from_keywords(input_ids, **generate_options).checked(model)
    settings = call.settings
    cache = build_cache(
        model,
        record,
        batch=call.input_ids.shape[0],
        prompt_len=call.input_ids.shape[1],
        max_steps=settings.max_denoising_steps,
        n_canvases=math.ceil(settings.max_new_tokens / model.cfg.canvas_length),
    )
    return run_generation(model, call, cache), cache


def run_generation(
    model: HookedDiffusionGemma, call: GenerationCall, cache: DenoisingCache | None = None
) -> GenerationResult:
    """Run a resolved generation, recording into `cache` if given; hooks never outlive the call."""
    hooks = list(call.fwd_hooks) + (cache.recording_hooks(model) if cache is not None else [])
    completed = False
    try:
        with model.hooks_for_run(fwd_hooks=hooks, bwd_hooks=call.bwd_hooks):
            grad_needed = any(point.thread_hooks("bwd") for point in model.hook_dict.values())
            with torch.enable_grad() if grad_needed else torch.inference_mode():
                result = one_lane_generation(model, call, cache)
        completed = True
        return result
    finally:
        model.hook_ctx.reset()
        if cache is not None:
            cache.finish(complete=completed)


def one_lane_generation(
    model: HookedDiffusionGemma, call: GenerationCall, cache: DenoisingCache | None
) -> GenerationResult:
    """The generation as one lane of the denoising loop (resumed at its fork step, if any)."""
    resume = call.resume
    lane = Lane(call.input_ids, join_step=resume.step if resume is not None else 0)
    run = LoopRun(call.settings, call.noise, call.self_cond_transform, cache, call.progress)
    loop = DenoisingLoop(model, run, [lane], fork=None if resume is None else (lambda step: resume))
    loop.run_all(None if resume is None else resume.prompt_state, call.attention_mask)
    pad_id, sequences = call.settings.pad_id(model.cfg), lane.sequences
    new = sequences[:, call.input_ids.shape[1] :]
    if pad_id is not None:
        valid = (new != pad_id).sum(-1)
    else:
        valid = torch.full((sequences.shape[0],), new.shape[1], device=sequences.device)
    settings_record = trace_settings(call.settings, call.noise, model.cfg)
    trace = DenoisingTrace(lane.canvases, call.input_ids.shape[1], settings_record, model_fingerprint(model))
    return GenerationResult(sequences, trace, valid / lane.forward_passes)
