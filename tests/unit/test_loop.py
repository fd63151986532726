"""The one denoising loop (#31): lanes of `DenoisingLoop`, the trace recorder, re-entering a recorded
step, the settings path, and the layout rules of sampling/ and patching/ (no function over 80 lines, no
underscore name imported from another module)."""

from __future__ import annotations

import ast
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from reference import CANVAS, build_pair
from tolerance import model_depth, reordering_atol

from diffusionlens.patching.free_fast import PerCellNoise
from diffusionlens.sampling.loop import DenoisingLoop, Lane, LoopRun, TraceRecorder
from diffusionlens.sampling.noise import ReplayNoise
from diffusionlens.sampling.recorded import encode_prompt, rerun_recorded_pass
from diffusionlens.sampling.settings import GenerationSettings
from diffusionlens.sampling.trace import CanvasTrace

PACKAGE = Path(__file__).resolve().parents[2] / "diffusionlens"
SETTINGS = GenerationSettings(max_new_tokens=CANVAS["mixed"] * 2, max_denoising_steps=5, eos_token_id=None)


@pytest.fixture(scope="module")
def model():
    return build_pair("mixed", seed=4)[1]


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(5))


def test_rerun_recorded_pass_recomputes_every_recorded_step(model, prompt):
    """Re-entering a recorded step (prompt state rebuilt canvas by canvas, the trace's canvas, the
    recorded self-conditioning input) is generation's own decoder pass: equal by construction."""
    names = ["decoder.hook_logits", "decoder.self_cond.hook_logits_in"]
    result, cache = model.generate_with_cache(
        prompt, names_filter=names, settings=SETTINGS, noise=ReplayNoise(2), progress=False
    )
    assert len(result.trace) == 2, "the run must reach a second canvas to test its prompt state"
    with torch.inference_mode():
        for canvas in range(2):
            state = encode_prompt(model, prompt, None, result.sequences, canvas)
            for step in range(result.trace.steps(canvas)):
                self_cond = cache.get(names[1], canvas=canvas, step=step) if step > 0 else None
                logits = rerun_recorded_pass(model, result.trace, state, self_cond, canvas=canvas, step=step)
                assert torch.equal(logits, cache.get(names[0], canvas=canvas, step=step)), (canvas, step)
    model.hook_ctx.reset()


def test_encode_prompt_of_a_later_canvas_needs_the_sequences(model, prompt):
    with pytest.raises(ValueError, match="sequences"):
        encode_prompt(model, prompt, None, None, 1)


def test_one_lane_is_generate(model, prompt):
    """A plain generation is one lane of the loop: the same sequences and trace as `generate`."""
    noise = ReplayNoise(7)
    expected = model.generate(prompt, settings=SETTINGS, noise=noise, progress=False)
    lane = Lane(prompt)
    with torch.inference_mode():
        DenoisingLoop(model, LoopRun(SETTINGS, noise), [lane]).run_all()
    model.hook_ctx.reset()
    assert torch.equal(lane.sequences, expected.sequences)
    for ours, theirs in zip(lane.canvases, expected.trace.canvases, strict=True):
        assert ours.tensors().keys() == theirs.tensors().keys()
        assert all(torch.equal(ours.tensors()[k], theirs.tensors()[k]) for k in ours.tensors())


def test_lanes_apply_their_own_hooks_to_their_own_rows(model, prompt):
    """Two lanes, one of which zeroes an attention output: each lane's first decoder pass is its own
    generation's (with or without the hook). The lanes run as one batch of twice the rows, so the
    logits agree to the reordering tolerance of a full decoder pass, not bit for bit."""
    name, zero = "decoder.blocks.0.hook_attn_out", (lambda value, hook: value * 0)
    noise, logits = ReplayNoise(3), "decoder.hook_logits"
    own = [
        model.generate_with_cache(
            prompt, names_filter=logits, settings=SETTINGS, noise=noise, progress=False, fwd_hooks=hooks
        )[1].get(logits, canvas=0, step=0)
        for hooks in ([], [(name, zero)])
    ]
    kept: list[dict] = [{}, {}]
    lanes = [
        Lane(prompt, hooks=hooks, keep_logits=lambda c, s, raw, held=held: held.setdefault((c, s), raw.clone()))
        for hooks, held in zip(({}, {name: zero}), kept, strict=True)
    ]
    with torch.inference_mode():
        state = model.encode(prompt)
        loop = DenoisingLoop(model, LoopRun(SETTINGS, PerCellNoise(noise, prompt.shape[0])), lanes)
        with model.hooks_for_run(fwd_hooks=loop.lane_hooks()):
            loop.run_all(state)
    model.hook_ctx.reset()
    for held, expected in zip(kept, own, strict=True):
        atol = reordering_atol(torch.float32, magnitude=float(expected.abs().max()), depth=model_depth(model))
        torch.testing.assert_close(held[(0, 0)], expected, rtol=0, atol=atol)
    assert (own[0] - own[1]).abs().max() > 100 * atol, "the hook changed nothing: the test lost its power"


def test_several_lanes_need_an_encoded_prompt(model, prompt):
    lanes = [Lane(prompt), Lane(prompt)]
    with pytest.raises(ValueError, match="prompt_state"):
        DenoisingLoop(model, LoopRun(SETTINGS, ReplayNoise(0)), lanes).run_all()


def test_trace_recorder_fills_every_canvas_trace_field():
    assert set(TraceRecorder().rows) == {f.name for f in fields(CanvasTrace)}


def test_unknown_setting_keyword_is_refused_with_the_fields(model, prompt):
    with pytest.raises(TypeError, match=r"unknown generation setting.*max_steps.*max_denoising_steps"):
        model.generate(prompt, max_steps=3, progress=False)
    with pytest.raises(TypeError, match=r"unknown generation setting.*max_steps"):
        model.generate_with_cache(prompt, names_filter="decoder.hook_logits", max_steps=3, progress=False)


def _python_files(*folders: str) -> list[Path]:
    files: list[Path] = []
    for folder in folders:
        files += sorted((PACKAGE / folder).glob("*.py"))
    return files


def test_no_function_in_sampling_patching_or_cache_code_is_over_80_lines():
    long = []
    for path in _python_files("sampling", "patching", "cache"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > 80:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.name} ({length} lines)")
    assert not long, f"split these functions: {long}"


def test_no_underscore_name_is_imported_across_modules():
    crossing = []
    for path in _python_files("sampling", "patching"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("diffusionlens"):
                crossing += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not crossing, f"make these public or keep them in their module: {crossing}"


def test_a_lane_that_ends_in_a_later_canvas_leaves_the_others_running(model, prompt):
    """In the second canvas one lane's logits are made certain of eos: it stops after two steps (its
    draft is stable and confident) and leaves the step loop, and ends there (eos). The other lane goes on
    with its own rows of the encoded prompt state, into the third canvas."""
    eos, length = 5, model.cfg.canvas_length
    settings = SETTINGS.replace(max_new_tokens=3 * length, eos_token_id=eos, pad_token_id=0)

    def certain_of_eos_in_second_canvas(value, hook):
        if hook.ctx.canvas != 1:
            return None
        certain = torch.full_like(value, -100.0)
        certain[..., eos] = 100.0
        return certain

    noise = ReplayNoise(1)
    alone = model.generate(prompt, settings=settings, noise=noise, progress=False)
    lanes = [Lane(prompt), Lane(prompt, hooks={"sampler.hook_logits": certain_of_eos_in_second_canvas})]
    with torch.inference_mode():
        state = model.encode(prompt)
        loop = DenoisingLoop(model, LoopRun(settings, PerCellNoise(noise, prompt.shape[0])), lanes)
        with model.hooks_for_run(fwd_hooks=loop.lane_hooks()):
            loop.run_all(state)
    model.hook_ctx.reset()
    assert len(alone.trace) == 3 and alone.trace.steps(1) > 2, "the unhooked lane must run on for this test"
    assert [len(lane.canvases) for lane in lanes] == [3, 2]
    assert lanes[1].canvases[1].n_steps == 2 and lanes[0].canvases[1].n_steps > 2
    assert lanes[1].done and lanes[1].sequences.shape[1] == prompt.shape[1] + 2 * length
    assert torch.equal(lanes[0].canvases[2].input_canvas[0], alone.trace[2].input_canvas[0])
