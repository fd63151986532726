"""Recorded runs and patched re-runs, free-running or on a frozen trajectory.

Free-running: the patched run generates again with the base run's `ReplayNoise` draws, so any
difference is caused by the patch; metrics read the final answer or any step. Frozen trajectory:
the base run's recorded decoder inputs (canvas and self-conditioning logits) of chosen steps are
re-run with the patch applied, without re-sampling; metrics read those steps' logits. Both return
a `PatchedRun`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int

from diffusionlens.cache.denoising import DenoisingCache
from diffusionlens.patching.spec import Patch, patch_hooks
from diffusionlens.sampling.generate import ForkState, chosen_self_cond_transform, run_settings
from diffusionlens.sampling.noise import ReplayNoise, RowReplayNoise
from diffusionlens.sampling.recorded import encode_prompt, rerun_recorded_pass
from diffusionlens.sampling.settings import GenerationSettings, settings_of
from diffusionlens.sampling.trace import DenoisingTrace
from diffusionlens.tokens import checked_attention_mask

if TYPE_CHECKING:
    from diffusionlens.components.prompt_state import PromptState
    from diffusionlens.model import HookedDiffusionGemma

SETTING_NAMES = frozenset(f.name for f in fields(GenerationSettings))
LOGITS = "decoder.hook_logits"
SELF_COND = "decoder.self_cond.hook_logits_in"


@dataclass
class PatchedRun:
    """A run (recorded or patched). `logits[(canvas, step)]` are the decoder's raw logits
    `[batch, canvas, vocab]`; free-running runs also have `sequences`, a fresh `trace` and `cache`."""

    input_ids: Int[torch.Tensor, "batch pos"]
    attention_mask: torch.Tensor | None
    mode: str
    trace: DenoisingTrace
    logits: dict[tuple[int, int], Float[torch.Tensor, "batch canvas vocab"]]
    sequences: Int[torch.Tensor, "batch length"] | None = None
    cache: DenoisingCache | None = None
    generate_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def settings(self) -> GenerationSettings:
        """The generation settings the run was made with (its `settings=` object and keywords, resolved)."""
        return settings_of(self.generate_kwargs)

    def steps(self, canvas: int = 0) -> list[int]:
        return sorted(s for c, s in self.logits if c == canvas)

    def logits_at(self, step: int = -1, canvas: int = 0) -> Float[torch.Tensor, "batch canvas vocab"]:
        """Logits of a step; negative steps count from the last step the base trajectory ran."""
        if step < 0:
            step = self.trace.steps(canvas) + step
        try:
            return self.logits[(canvas, step)]
        except KeyError:
            raise KeyError(
                f"no logits for canvas {canvas}, step {step} in this {self.mode} run; recorded: {self.steps(canvas)}"
            ) from None

    def answer(self, canvas: int = 0) -> Int[torch.Tensor, "batch canvas"]:
        """The tokens a free-running run wrote into `canvas` (after eos padding)."""
        if self.sequences is None:
            raise ValueError("a frozen-trajectory run does not sample; use mode='free' for answers")
        length = self.trace[canvas].input_canvas.shape[-1]
        start = self.input_ids.shape[1] + canvas * length
        return self.sequences[:, start : start + length]


def record_run(
    model: HookedDiffusionGemma,
    input_ids: Int[torch.Tensor, "batch pos"],
    *,
    names_filter: Any = (),
    attention_mask: torch.Tensor | None = None,
    noise: Any = None,
    patches: Patch | Sequence[Patch] = (),
    **generate_kwargs: Any,
) -> PatchedRun:
    """Generate (free-running, with `ReplayNoise(0)` unless `noise` is given), recording the decoder
    logits and self-conditioning inputs every step (what frozen re-runs and metrics need) plus the
    hooks in `names_filter` (what a patch will copy from this run). The settings (`settings=` and any
    settings keywords) are resolved here once; the run keeps the one `GenerationSettings` object in
    its `generate_kwargs`."""
    input_ids = model.check_tokens(input_ids, "input_ids")
    names = [names_filter] if isinstance(names_filter, str) else list(names_filter or ())
    settings = settings_of(generate_kwargs)
    others = {k: v for k, v in generate_kwargs.items() if k not in SETTING_NAMES}
    kwargs = {"noise": noise if noise is not None else ReplayNoise(0), "progress": False, **others}
    kwargs["settings"] = settings
    hooks = patch_hooks(model, patches, settings.max_denoising_steps) + list(kwargs.pop("fwd_hooks", ()))
    result, cache = model.generate_with_cache(
        input_ids,
        names_filter=[LOGITS, SELF_COND, *names],
        attention_mask=attention_mask,
        fwd_hooks=hooks,
        **kwargs,
    )
    logits = {(c, s): cache.get(LOGITS, canvas=c, step=s) for c in cache.canvases() for s in cache.steps(c)}
    return PatchedRun(input_ids, attention_mask, "free", result.trace, logits, result.sequences, cache, kwargs)


def run_patched(
    model: HookedDiffusionGemma,
    base: PatchedRun,
    patches: Patch | Sequence[Patch],
    *,
    mode: str = "free",
    steps: Sequence[int] | None = None,
    canvas: int = 0,
    names_filter: Any = (),
    fork_at: int | None = None,
    prompt_state: PromptState | None = None,
) -> PatchedRun:
    """Re-run `base` (usually the corrupted run) with `patches` applied.

    mode="free": generate again with the same settings and noise. mode="frozen": re-run the base
    trajectory's decoder passes of `canvas` at `steps` (default: every step it ran) with the base
    run's own canvases and self-conditioning inputs, so only the patch differs.

    `fork_at=s` (free mode; the patches must not touch the first canvas before step s, nor the
    encoder's first pass) resumes `base` at step s of its first canvas instead of regenerating steps
    0 … s-1, which with replayed noise are the base run's own: see `fork_state`. The result's
    logits for those steps are the base run's; its cache holds steps s onwards. `prompt_state`: the
    base run's encoded prompt, when the caller has it already (else it is encoded once here).
    """
    if mode == "free" and fork_at is not None:
        resume = fork_state(model, base, fork_at, prompt_state)
        kwargs = {**base.generate_kwargs, "resume": resume}
        run = record_run(
            model,
            base.input_ids,
            attention_mask=base.attention_mask,
            names_filter=names_filter,
            patches=patches,
            **kwargs,
        )
        run.generate_kwargs = base.generate_kwargs
        run.logits.update({(0, s): base.logits[(0, s)] for s in range(fork_at)})
        return run
    if mode == "free":
        return record_run(
            model,
            base.input_ids,
            attention_mask=base.attention_mask,
            names_filter=names_filter,
            patches=patches,
            **base.generate_kwargs,
        )
    if mode != "frozen":
        raise ValueError(f"mode must be 'free' or 'frozen', got {mode!r}")
    if base.cache is None or not base.cache.recorded_anywhere(SELF_COND):
        raise ValueError("frozen re-runs need a base run made by record_run (it records the decoder inputs)")
    run_steps = list(range(base.trace.steps(canvas))) if steps is None else list(steps)
    logits = {}
    try:
        hooks = patch_hooks(model, patches, base.settings.max_denoising_steps)
        with torch.inference_mode(), model.hooks_for_run(fwd_hooks=hooks):
            state = encode_through(model, base, canvas)
            for step in run_steps:
                self_cond = base.cache.get(SELF_COND, canvas=canvas, step=step) if step > 0 else None
                logits[(canvas, step)] = rerun_recorded_pass(
                    model, base.trace, state, self_cond, canvas=canvas, step=step
                )
    finally:
        model.hook_ctx.reset()
    return PatchedRun(
        base.input_ids, base.attention_mask, "frozen", base.trace, logits, None, None, base.generate_kwargs
    )


def encode_through(model: HookedDiffusionGemma, base: PatchedRun, canvas: int) -> PromptState:
    """The prompt state the decoder read in `canvas` of `base` (see `sampling.recorded.encode_prompt`;
    encoder hooks, and so prompt-channel patches, fire with ctx.canvas set)."""
    if canvas > 0 and base.sequences is None:
        raise ValueError("frozen re-runs of later canvases need a free-running base run with sequences")
    return encode_prompt(model, base.input_ids, base.attention_mask, base.sequences, canvas)


def fork_state(
    model: HookedDiffusionGemma, base: PatchedRun, step: int, prompt_state: PromptState | None = None
) -> ForkState:
    """The state `base`'s generation was in at the start of `step` of its first canvas, read from its
    trace (canvases, drafts, stopped rows) and cache (self-conditioning logits): what `generate(...,
    resume=...)` needs to go on from there. Needs replayed noise (`ReplayNoise`), whose draws do not
    depend on what ran before."""
    if not isinstance(base.generate_kwargs.get("noise"), ReplayNoise | RowReplayNoise):
        raise ValueError("forking a run needs ReplayNoise: torch's global RNG cannot be rewound to a step")
    if base.cache is None or not base.cache.recorded_anywhere(SELF_COND):
        raise ValueError("forking needs a base run made by record_run (it records the self-conditioning inputs)")
    trace = base.trace[0]
    if not 0 <= step < trace.n_steps:
        raise ValueError(f"cannot fork at step {step}: the base run's first canvas ran steps 0..{trace.n_steps - 1}")
    if prompt_state is None:
        ctx = model.hook_ctx
        try:
            with torch.inference_mode():
                prompt_state = encode_through(model, base, 0)
        finally:
            ctx.reset()
    batch = trace.input_canvas.shape[1]
    threshold = base.trace.settings.get("stability_threshold", 1)
    history = None
    if step > 0 and threshold > 0:
        blank = torch.full_like(trace.argmax[0], -1)
        history = torch.stack([trace.argmax[j] if j >= 0 else blank for j in range(step - threshold, step)])
    stopped_before = torch.cat([torch.zeros(1, batch, dtype=torch.bool), trace.finished[: max(step - 1, 0)]])[:step]
    prefix = {name: list(value[:step].unbind(0)) for name, value in trace.tensors().items()}
    return ForkState(
        step=step,
        canvas=trace.input_canvas[step],
        self_cond=base.cache.get(SELF_COND, canvas=0, step=step) if step > 0 else None,
        argmax_canvas=trace.argmax[step - 1] if step > 0 else trace.input_canvas[0],
        finished=trace.finished[step - 1] if step > 0 else torch.zeros(batch, dtype=torch.bool),
        stop_history=history,
        forward_passes=(~stopped_before).sum(0).int(),
        prompt_state=prompt_state,
        trace_prefix=prefix,
        input_ids=base.input_ids.cpu(),
        attention_mask=checked_attention_mask(base.attention_mask, base.input_ids).cpu(),
        run_settings=_run_settings_of(model, base),
    )


def _run_settings_of(model: HookedDiffusionGemma, base: PatchedRun) -> dict[str, Any]:
    """`run_settings` of the generation that recorded `base`, read back from its generate keywords."""
    kwargs = base.generate_kwargs
    transform = chosen_self_cond_transform(kwargs.get("bottleneck"), kwargs.get("self_cond_transform"))
    return run_settings(model, base.settings, kwargs["noise"], transform)
