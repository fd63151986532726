"""Gradients on a frozen model: backward hooks, run_with_cache(incl_bwd=True) and replay_step."""

from __future__ import annotations

import pytest
import torch

from diffusionlens import HookedDiffusionGemma

RESID = "decoder.blocks.0.hook_resid_post"


@pytest.fixture(autouse=True)
def clean(toy_pass):
    yield
    toy_pass[0].reset_hooks(including_permanent=True)


def test_loaded_model_is_frozen(toy_pass):
    assert not any(p.requires_grad for p in toy_pass[0].parameters())


def test_backward_hook_fires_on_a_frozen_model_and_matches_autograd(toy_pass):
    model, ids, canvas = toy_pass
    grads = {}
    acts = {}

    def keep_act(x, hook):
        acts[hook.name] = x

    logits = model.run_with_hooks(
        ids, canvas, fwd_hooks=[(RESID, keep_act)], bwd_hooks=[(RESID, lambda g, hook: grads.setdefault(hook.name, g))]
    )
    assert logits.requires_grad
    logits[0, 3, 7].backward()
    assert grads[RESID].shape == (1, model.cfg.canvas_length, model.cfg.hidden_size)
    assert grads[RESID].abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())  # parameter gradients stay off
    # the same gradient from autograd with the activation made a leaf by hand
    leaf = {}

    def make_leaf(x, hook):
        leaf["x"] = x.detach().requires_grad_(True)
        return leaf["x"]

    out = model.run_with_hooks(ids, canvas, fwd_hooks=[(RESID, make_leaf)])
    (expected,) = torch.autograd.grad(out[0, 3, 7], leaf["x"])
    torch.testing.assert_close(grads[RESID], expected, rtol=0, atol=0)


def test_run_with_cache_incl_bwd_caches_grad_names(toy_pass):
    model, ids, canvas = toy_pass
    names = ["decoder.blocks.0.hook_resid_post", "decoder.blocks.3.hook_resid_post"]
    with torch.no_grad():  # incl_bwd asks for gradients: it enables them itself
        logits, cache = model.run_with_cache(
            ids, canvas, names_filter=names, incl_bwd=True, loss_fn=lambda lg: lg[0, 3, 7]
        )
    assert {*names, *(n + "_grad" for n in names)} == set(cache.keys())
    for name in names:
        assert cache[name + "_grad"].shape == cache[name].shape
        assert not cache[name + "_grad"].requires_grad
        assert cache[name + "_grad"].abs().sum() > 0
    assert not model.has_hooks
    assert all(p.grad is None for p in model.parameters())


def test_run_with_cache_incl_bwd_on_a_scalar_output_needs_no_loss_fn(toy_pass):
    model, ids, canvas = toy_pass

    class LossModel(HookedDiffusionGemma):  # output already a scalar, as TL's return_type="loss"
        def forward(self, *args):
            return super().forward(*args)[0, 3, 7]

    loss_model = LossModel.from_config(model.cfg).requires_grad_(False)
    loss, cache = loss_model.run_with_cache(ids, canvas, names_filter=RESID, incl_bwd=True)
    assert loss.ndim == 0 and cache[RESID + "_grad"].abs().sum() > 0


def test_run_with_cache_incl_bwd_non_scalar_output_says_what_to_do(toy_pass):
    model, ids, canvas = toy_pass
    with pytest.raises(ValueError, match="loss_fn"):
        model.run_with_cache(ids, canvas, names_filter=RESID, incl_bwd=True)
    assert not model.has_hooks


def test_run_with_cache_validates_loss_fn(toy_pass):
    model, ids, canvas = toy_pass
    with pytest.raises(ValueError, match="incl_bwd=True"):
        model.run_with_cache(ids, canvas, names_filter=RESID, loss_fn=lambda lg: lg.sum())
    with pytest.raises(ValueError, match="a scalar"):
        model.run_with_cache(ids, canvas, names_filter=RESID, incl_bwd=True, loss_fn=lambda lg: lg[0])


# ---------------------------------------------------------------------------------------- replay_step
@pytest.fixture(scope="module")
def recorded(toy_pass):
    model = toy_pass[0]
    # two left-padded prompts; with this seed row 0 stops after step 1 of canvas 0 while row 1 runs on,
    # so the replay must hold row 0's self-conditioning fixed as generation does
    ids, mask = model.to_tokens_and_mask(["squares 4 8:", "add 12 3 =:"])
    torch.manual_seed(4)
    result, cache = model.generate_with_cache(
        ids,
        attention_mask=mask,
        names_filter="decoder.hook_logits",
        max_new_tokens=2 * model.cfg.canvas_length,
        max_denoising_steps=6,
        eos_token_id=None,
        progress=False,
    )
    assert len(result.trace) == 2 and result.trace[0].finished[1].tolist() == [True, False]
    return result, cache, ids, mask


@pytest.mark.parametrize(("canvas", "step"), [(0, 0), (0, 4), (1, 0), (1, 5)])
def test_replay_step_is_bit_identical_and_differentiable(toy_pass, recorded, canvas, step):
    model = toy_pass[0]
    result, cache, ids, mask = recorded
    logits = model.replay_step(result, ids, step=step, canvas=canvas, attention_mask=mask)
    assert logits.requires_grad
    expected = cache.get("decoder.hook_logits", canvas=canvas, step=step)
    assert torch.equal(logits.detach(), expected)
    # from a bare trace (sequences rebuilt from the trace's argmax and eos settings) as well
    again = model.replay_step(result.trace, ids, step=step, canvas=canvas, attention_mask=mask)
    assert torch.equal(again.detach(), expected)


def test_replay_step_gradients_reach_decoder_hooks_and_self_conditioning(toy_pass, recorded):
    model = toy_pass[0]
    result, _, ids, mask = recorded
    grads = {}
    names = [RESID, "decoder.self_cond.hook_logits_in", "decoder.hook_embed"]
    with model.hooks(bwd_hooks=[(n, lambda g, hook: grads.setdefault(hook.name, g)) for n in names]):
        with torch.no_grad():
            logits = model.replay_step(result, ids, step=2, attention_mask=mask)  # enables grad itself
        logits[1, 5].logsumexp(-1).backward()
    assert set(grads) == set(names)
    assert all(g.abs().sum() > 0 for g in grads.values())
    assert all(p.grad is None for p in model.parameters())


def test_replay_step_validates(toy_pass, recorded):
    model = toy_pass[0]
    result, _, ids, _ = recorded
    with pytest.raises(ValueError, match="step must be"):
        model.replay_step(result, ids, step=99)
    with pytest.raises(ValueError, match="canvas must be"):
        model.replay_step(result, ids, step=0, canvas=5)
    with pytest.raises(TypeError, match="GenerationResult or a DenoisingTrace"):
        model.replay_step({"trace": 1}, ids, step=0)
    with pytest.raises(ValueError, match="the prompt"):
        model.replay_step(result, ids[:, :-1], step=0)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        model.replay_step(result, ids, step=0)
