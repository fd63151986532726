"""nnsight on the toy model: with `set_module_call_hook_points(True)` nnsight reads and writes hook points at a
chosen step of a generation, its call index being `DenoisingTrace.pass_index(canvas, step)`."""

from __future__ import annotations

import pytest
import torch

from diffusionlens import HookedDiffusionGemma, ReplayNoise
from diffusionlens.hooks.points import HookPoint, TorchHookedHookPoint

nnsight = pytest.importorskip("nnsight")

POINT = "decoder.blocks.1.hook_resid_post"
STEPS = 4


@pytest.fixture(scope="module")
def toy():
    model = HookedDiffusionGemma.from_pretrained("toy", progress=False)
    yield model
    model.set_module_call_hook_points(False)


def settings(model):
    """Two canvases of exactly STEPS steps each (no EOS stop, a stability window longer than the run)."""
    return dict(
        max_new_tokens=2 * model.cfg.canvas_length,
        max_denoising_steps=STEPS,
        stability_threshold=STEPS + 1,
        eos_token_id=None,
        noise=ReplayNoise(0),
        progress=False,
    )


def envoy(wrapped, name):
    for part in name.split("."):
        wrapped = wrapped[int(part)] if part.isdigit() else getattr(wrapped, part)
    return wrapped


def test_switch_moves_points_onto_the_module_call_and_back(toy):
    toy.set_module_call_hook_points(True)
    assert all(type(p) is TorchHookedHookPoint for p in toy.hook_dict.values())
    toy.set_module_call_hook_points(False)
    assert all(type(p) is HookPoint for p in toy.hook_dict.values())
    # a point with a torch hook keeps the module call, or its hook would stop firing
    handle = toy.hook_dict[POINT].register_forward_hook(lambda *args: None)
    try:
        toy.set_module_call_hook_points(False)
        assert type(toy.hook_dict[POINT]) is TorchHookedHookPoint
    finally:
        handle.remove()
        toy.hook_dict[POINT].use_module_call(False)
    assert type(toy.hook_dict[POINT]) is HookPoint
    with pytest.raises(ValueError, match="enabled must be True or False"):
        toy.set_module_call_hook_points("yes")


def test_default_fast_path_is_invisible_to_nnsight(toy):
    toy.set_module_call_hook_points(False)
    ids = toy.to_tokens("squares 4 8:")
    with pytest.raises(Exception, match="ran past it"):
        with nnsight.NNsight(toy).trace(ids, fn="generate", **settings(toy)):
            envoy(nnsight.NNsight(toy), POINT).output.save()


def test_nnsight_reads_a_hook_point_at_a_chosen_canvas_and_step(toy):
    ids = toy.to_tokens("squares 4 8:")
    seen: dict[tuple[int, int], torch.Tensor] = {}
    toy.add_hook(POINT, lambda x, hook: seen.__setitem__((hook.ctx.canvas, hook.ctx.step), x.clone()))
    toy.set_module_call_hook_points(True)
    wrapped = nnsight.NNsight(toy)
    try:
        reference = toy.generate(ids, **settings(toy))
        index = reference.trace.pass_index(canvas=1, step=2)
        assert index == STEPS + 2
        with wrapped.trace(ids, fn="generate", **settings(toy)) as tracer:
            for _ in tracer.iter[index]:
                read = envoy(wrapped, POINT).output.save()
    finally:
        toy.reset_hooks()
    # our own hook and nnsight see the same call of the same point: equal by construction
    assert torch.equal(read, seen[(1, 2)])
    assert not torch.equal(read, seen[(0, 2)])


def test_nnsight_write_at_a_step_matches_a_diffusionlens_hook_at_that_step(toy):
    ids = toy.to_tokens("squares 4 8:")
    toy.set_module_call_hook_points(True)
    wrapped = nnsight.NNsight(toy)
    plain = toy.generate(ids, **settings(toy))
    index = plain.trace.pass_index(canvas=0, step=1)
    with wrapped.trace(ids, fn="generate", **settings(toy)) as tracer:
        for _ in tracer.iter[index]:
            envoy(wrapped, POINT).output[:] = 0
        sequences = tracer.result.sequences.save()

    def zero_at_step_1(x, hook):
        return torch.zeros_like(x) if (hook.ctx.canvas, hook.ctx.step) == (0, 1) else None

    hooked = toy.generate(ids, fwd_hooks=[(POINT, zero_at_step_1)], **settings(toy))
    assert not torch.equal(hooked.sequences, plain.sequences)  # the write changes the generation
    assert torch.equal(sequences, hooked.sequences)


def test_pass_index_refuses_steps_that_did_not_run(toy):
    result = toy.generate(toy.to_tokens("squares 4 8:"), **settings(toy))
    with pytest.raises(IndexError, match="canvas 0 ran 4 steps"):
        result.trace.pass_index(0, STEPS)
    with pytest.raises(IndexError, match="ran 2 canvases"):
        result.trace.pass_index(2, 0)
