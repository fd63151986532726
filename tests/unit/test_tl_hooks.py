"""TransformerLens hook habits: permanent hooks, reset semantics, prepend, per-hook ctx dicts, torch
module hooks on hook points, and pickling the model."""

from __future__ import annotations

import io
import pickle

import pytest
import torch

from diffusionlens import HookPoint

RESID = "decoder.blocks.0.hook_resid_post"


@pytest.fixture(autouse=True)
def clean(toy_pass):
    yield
    toy_pass[0].reset_hooks(including_permanent=True)


def run(model, ids, canvas, **kw):
    with torch.no_grad():
        return model.run_with_hooks(ids, canvas, **kw)


def test_perma_hook_survives_reset_hooks_and_run_with_hooks(toy_pass):
    model, ids, canvas = toy_pass
    calls: list[str] = []
    model.add_perma_hook(RESID, lambda x, hook: calls.append("perma"))
    model.add_hook(RESID, lambda x, hook: calls.append("temp"))
    model.reset_hooks()  # TL default: permanent hooks stay
    run(model, ids, canvas, fwd_hooks=[(RESID, lambda x, hook: calls.append("run"))])
    assert calls == ["perma", "run"]
    calls.clear()
    with torch.no_grad():
        model(ids, canvas)
    assert calls == ["perma"]
    model.reset_hooks(including_permanent=True)
    assert not model.has_hooks


def test_run_with_hooks_reset_hooks_end_false_leaves_hooks_on(toy_pass):
    model, ids, canvas = toy_pass
    calls: list[int] = []
    run(model, ids, canvas, fwd_hooks=[(RESID, lambda x, hook: calls.append(1))], reset_hooks_end=False)
    with torch.no_grad():
        model(ids, canvas)
    assert calls == [1, 1]
    model.reset_hooks()
    with torch.no_grad():
        model(ids, canvas)
    assert calls == [1, 1]


def test_prepend_runs_first(toy_pass):
    model, ids, canvas = toy_pass
    order: list[str] = []
    model.add_hook(RESID, lambda x, hook: order.append("first added"))
    model.add_hook(RESID, lambda x, hook: order.append("prepended"), prepend=True)
    with torch.no_grad():
        model(ids, canvas)
    assert order == ["prepended", "first added"]


def test_ctx_is_a_per_hook_dict_that_still_reads_the_step(toy_pass):
    model, ids, canvas = toy_pass
    point = model.hook_dict[RESID]
    other = model.hook_dict["decoder.blocks.1.hook_resid_post"]
    seen = []

    def count(x, hook):
        hook.ctx["calls"] = hook.ctx.get("calls", 0) + 1
        seen.append((hook.ctx.step, hook.ctx.canvas, hook.ctx.t))

    model.generate(ids, max_new_tokens=model.cfg.canvas_length, max_denoising_steps=3, progress=False,
                   eos_token_id=None, fwd_hooks=[(RESID, count)])  # fmt: skip
    assert isinstance(point.ctx, dict)
    steps_run = len(seen)
    assert point.ctx["calls"] == steps_run >= 2
    assert seen == [(0, 0, 3), (1, 0, 2), (2, 0, 1)][:steps_run]
    assert "calls" not in other.ctx  # one dict per hook point, as TL
    run(model, ids, canvas, fwd_hooks=[(RESID, count)])
    assert point.ctx["calls"] == steps_run + 1  # run_with_hooks keeps contexts (clear_contexts=False)
    run(model, ids, canvas, fwd_hooks=[(RESID, count)], clear_contexts=True)
    assert point.ctx == {}
    point.ctx["x"] = 1
    model.reset_hooks()  # TL: reset_hooks clears contexts by default
    assert point.ctx == {}
    with pytest.raises(AttributeError, match="model.hook_ctx"):
        point.ctx.step = 3


def test_ctx_shares_state_between_forward_and_backward_hook(toy_pass):
    model, ids, canvas = toy_pass
    grads = {}

    def remember(x, hook):
        hook.ctx["activation"] = x.detach()

    def attribute(grad, hook):
        grads["attribution"] = (hook.ctx.pop("activation") * grad).sum()

    logits = model.run_with_hooks(ids, canvas, fwd_hooks=[(RESID, remember)], bwd_hooks=[(RESID, attribute)])
    logits[0, 0, 5].backward()
    assert torch.isfinite(grads["attribution"]) and grads["attribution"] != 0
    assert "activation" not in model.hook_dict[RESID].ctx


def test_torch_module_hooks_on_a_hook_point_fire(toy_pass):
    model, ids, canvas = toy_pass
    point = model.hook_dict[RESID]
    seen = {}
    with torch.no_grad():
        base = model(ids, canvas)
    pre = point.register_forward_pre_hook(lambda mod, args: seen.update(pre=args[0].shape))
    post = point.register_forward_hook(lambda mod, args, out: out * 0)
    try:
        with torch.no_grad():
            zeroed = model(ids, canvas)
        assert seen["pre"] == (1, model.cfg.canvas_length, model.cfg.hidden_size)
        assert not torch.equal(zeroed, base)
    finally:
        pre.remove()
        post.remove()
    with torch.no_grad():
        assert torch.equal(model(ids, canvas), base)
    assert isinstance(point, HookPoint)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")  # the graph starts at this point
def test_full_backward_hook_on_a_hook_point_fires(toy_pass):
    model, ids, canvas = toy_pass
    point = model.hook_dict[RESID]
    seen = []
    handle = point.register_full_backward_hook(lambda mod, gin, gout: seen.append(gout[0].shape))
    try:
        model.add_hook(RESID, lambda g, hook: None, dir="bwd")  # builds the graph on a frozen model
        model(ids, canvas)[0, 0, 5].backward()
    finally:
        handle.remove()
    assert seen == [(1, model.cfg.canvas_length, model.cfg.hidden_size)]


def test_hooks_removed_when_a_hook_raises(toy_pass):
    model, ids, canvas = toy_pass

    def boom(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run(model, ids, canvas, fwd_hooks=[(RESID, boom)], bwd_hooks=[(RESID, lambda g, h: None)])
    assert not model.has_hooks
    with pytest.raises(RuntimeError, match="boom"):
        run(model, ids, canvas, fwd_hooks=[(RESID, boom)], reset_hooks_end=False)
    assert model.has_hooks  # reset_hooks_end=False keeps them, even on error, as TL does


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dir": "forward"}, "dir must be 'fwd' or 'bwd'"),
        ({"prepend": "yes"}, "prepend must be True or False"),
        ({"is_permanent": 1}, "is_permanent must be True or False"),
    ],
)
def test_add_hook_validates(toy_pass, kwargs, message):
    with pytest.raises(ValueError, match=message):
        toy_pass[0].add_hook(RESID, lambda x, h: None, **kwargs)


def test_add_hook_needs_a_callable(toy_pass):
    with pytest.raises(TypeError, match="fn\\(tensor, hook\\)"):
        toy_pass[0].add_hook(RESID, "not a function")


def test_reset_hooks_validates_direction(toy_pass):
    with pytest.raises(ValueError, match="direction must be"):
        toy_pass[0].reset_hooks(direction="up")


@pytest.mark.parametrize("flag", ["clear_contexts", "including_permanent"])
def test_reset_hooks_validates_flags(toy_pass, flag):
    model = toy_pass[0]
    model.add_perma_hook(RESID, lambda x, h: None)
    with pytest.raises(ValueError, match=f"{flag} must be True or False"):
        model.reset_hooks(**{flag: "no"})
    assert model.has_hooks  # refused before removing anything


def test_reset_hooks_by_direction(toy_pass):
    model = toy_pass[0]
    model.add_hook(RESID, lambda x, h: None)
    model.add_hook(RESID, lambda x, h: None, dir="bwd")
    model.reset_hooks(direction="fwd")
    point = model.hook_dict[RESID]
    assert not point.fwd_fns and len(point.bwd_fns) == 1


def test_pickle_round_trip_gives_identical_logits(toy_pass):
    model, ids, canvas = toy_pass
    with torch.no_grad():
        base = model(ids, canvas)
    for restored in (pickle.loads(pickle.dumps(model)), _torch_round_trip(model)):
        with torch.no_grad():
            assert torch.equal(restored(ids, canvas), base)
        restored.add_hook(RESID, lambda x, hook: hook.ctx.__setitem__("step_seen", hook.ctx.step))
        with torch.no_grad():
            restored(ids, canvas)
        assert restored.hook_dict[RESID].ctx["step_seen"] is None
        assert restored.hook_ctx is restored.hook_dict[RESID].ctx.shared  # context still shared


def _torch_round_trip(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_pickle_with_hooks_attached_refuses_clearly(toy_pass):
    model = toy_pass[0]
    model.add_hook(RESID, lambda x, h: None)
    with pytest.raises(pickle.PicklingError, match="reset_hooks\\(including_permanent=True\\)"):
        pickle.dumps(model)
