"""Port of TransformerLens's tests/integration/test_hooks.py (TransformerLensOrg/TransformerLens at commit
4cd36aaeb5dad931d085bd5d46a12b402fe15272), assertions unchanged.

Adaptations: the pretrained solu-1l becomes the shipped toy model, `model(prompt)` / `model.forward(prompt)`
become `model(ids, canvas)`, and hook names carry the `decoder.` prefix. `test_prepending_hooks` zeroes the
last block's output (TL's model has one block): the final RMSNorm of zeros is zeros, so the logits are then
the unembedding bias, `model.b_U` (zeros here). `test_conditional_hooks` keeps the one switch this model has,
`set_use_attn_result` (TL's `hook_q_input`, `hook_mlp_in` and `hook_attn_in` do not exist here), and expects
a ValueError naming the switch where TL asserts.
"""

from typing import Any

import pytest
import torch

HOOK_EMBED = "decoder.hook_embed"
embed = lambda name: name == HOOK_EMBED  # noqa: E731


@pytest.fixture(scope="module")
def setup(toy_pass):
    return toy_pass


@pytest.fixture(autouse=True)
def clean(setup):
    yield
    setup[0].remove_all_hook_fns(including_permanent=True)
    setup[0].set_use_attn_result(False)


class Counter:
    def __init__(self):
        self.count = 0

    def inc(self, *args, **kwargs):
        self.count += 1


def test_hook_attaches_normally(setup):
    model, ids, canvas = setup
    c = Counter()
    _ = model.run_with_hooks(ids, canvas, fwd_hooks=[(embed, c.inc)])
    assert all([len(hp.fwd_hooks) == 0 for _, hp in model.hook_dict.items()])
    assert c.count == 1
    model.remove_all_hook_fns(including_permanent=True)


def test_perma_hook_attaches_normally(setup):
    model, ids, canvas = setup
    c = Counter()
    model.add_perma_hook(embed, c.inc)
    assert len(model.hook_dict[HOOK_EMBED].fwd_hooks) == 1
    model.run_with_hooks(ids, canvas, fwd_hooks=[])
    assert len(model.hook_dict[HOOK_EMBED].fwd_hooks) == 1
    assert c.count == 1
    model.remove_all_hook_fns(including_permanent=True)


def test_hook_context_manager(setup):
    model, ids, canvas = setup
    c = Counter()
    with model.hooks(fwd_hooks=[(embed, c.inc)]):
        assert len(model.hook_dict[HOOK_EMBED].fwd_hooks) == 1
        model.forward(ids, canvas)
    assert len(model.hook_dict[HOOK_EMBED].fwd_hooks) == 0
    assert c.count == 1
    model.remove_all_hook_fns(including_permanent=True)


def test_nested_hook_context_manager(setup):
    model, ids, canvas = setup
    c = Counter()
    with model.hooks(fwd_hooks=[(embed, c.inc)]):
        assert len(model.hook_dict[HOOK_EMBED].fwd_hooks) == 1
        model.forward(ids, canvas)
        assert c.count == 1
        with model.hooks(fwd_hooks=[(embed, c.inc)]):
            assert len(model.hook_dict[HOOK_EMBED].fwd_hooks) == 2
            model.forward(ids, canvas)
            assert c.count == 3  # 2 from outer, 1 from inner
        assert len(model.hook_dict[HOOK_EMBED].fwd_hooks) == 1
    assert len(model.hook_dict[HOOK_EMBED].fwd_hooks) == 0
    assert c.count == 3
    model.remove_all_hook_fns(including_permanent=True)


def test_context_manager_run_with_cache(setup):
    model, ids, canvas = setup
    c = Counter()
    with model.hooks(fwd_hooks=[(embed, c.inc)]):
        assert len(model.hook_dict[HOOK_EMBED].fwd_hooks) == 1
        model.run_with_cache(ids, canvas)
        assert len(model.hook_dict[HOOK_EMBED].fwd_hooks) == 1
    assert len(model.hook_dict[HOOK_EMBED].fwd_hooks) == 0
    assert c.count == 1
    model.remove_all_hook_fns(including_permanent=True)


def test_backward_hook_runs_successfully(setup):
    model, ids, canvas = setup
    c = Counter()

    def skip_grad(output_grad: torch.Tensor, hook: Any):
        c.inc()
        return (output_grad,)

    with model.hooks(bwd_hooks=[(embed, skip_grad)]):
        assert len(model.hook_dict[HOOK_EMBED].bwd_hooks) == 1
        out = model(ids, canvas)
        assert c.count == 0
        out.sum().backward()  # this should run the hook
        assert len(model.hook_dict[HOOK_EMBED].bwd_hooks) == 1
    assert len(model.hook_dict[HOOK_EMBED].bwd_hooks) == 0
    assert c.count == 1
    model.remove_all_hook_fns(including_permanent=True)


def test_backward_hook_returning_bare_tensor(setup):
    """Regression test for TL's issue #1160: a backward hook may return a bare tensor."""
    model, ids, canvas = setup
    c = Counter()

    def modify_grad(grad: torch.Tensor, hook: Any):
        c.inc()
        return grad  # bare tensor, NOT (grad,)

    with model.hooks(bwd_hooks=[("decoder.blocks.0.hook_resid_post", modify_grad)]):
        out = model(ids, canvas)
        out.sum().backward()
    assert c.count == 1
    model.remove_all_hook_fns(including_permanent=True)


def test_backward_hook_returning_none(setup):
    """Backward hooks returning None should not raise."""
    model, ids, canvas = setup
    c = Counter()

    def observe_grad(grad: torch.Tensor, hook: Any):
        c.inc()
        return None

    with model.hooks(bwd_hooks=[("decoder.blocks.0.hook_resid_post", observe_grad)]):
        out = model(ids, canvas)
        out.sum().backward()
    assert c.count == 1
    model.remove_all_hook_fns(including_permanent=True)


def test_hook_context_manager_with_permanent_hook(setup):
    model, ids, canvas = setup
    c = Counter()
    model.add_perma_hook(embed, c.inc)
    assert len(model.hook_dict[HOOK_EMBED].fwd_hooks) == 1
    with model.hooks(fwd_hooks=[(embed, c.inc)]):
        assert len(model.hook_dict[HOOK_EMBED].fwd_hooks) == 2
        model.forward(ids, canvas)
    assert len(model.hook_dict[HOOK_EMBED].fwd_hooks) == 1
    assert c.count == 2  # 1 from permanent, 1 from context manager
    model.remove_all_hook_fns(including_permanent=True)


def test_nested_context_manager_with_failure(setup):
    model, ids, canvas = setup

    def fail_hook(z, hook):
        raise ValueError("fail")

    c = Counter()
    with model.hooks(fwd_hooks=[(embed, c.inc)]):
        with pytest.raises(ValueError):
            with model.hooks(fwd_hooks=[(embed, fail_hook)]):
                assert len(model.hook_dict[HOOK_EMBED].fwd_hooks) == 2
                model.forward(ids, canvas)
        assert len(model.hook_dict[HOOK_EMBED].fwd_hooks) == 1
        assert c.count == 1
    assert len(model.hook_dict[HOOK_EMBED].fwd_hooks) == 0
    model.remove_all_hook_fns(including_permanent=True)


def test_reset_hooks_in_context_manager(setup):
    model, ids, canvas = setup
    c = Counter()
    with model.hooks(fwd_hooks=[(embed, c.inc)]):
        assert len(model.hook_dict[HOOK_EMBED].fwd_hooks) == 1
        model.reset_hooks()
        assert len(model.hook_dict[HOOK_EMBED].fwd_hooks) == 0
    assert len(model.hook_dict[HOOK_EMBED].fwd_hooks) == 0
    model.remove_all_hook_fns(including_permanent=True)


def test_remove_hook(setup):
    model, ids, canvas = setup
    c = Counter()
    model.add_perma_hook(embed, c.inc)
    assert len(model.hook_dict[HOOK_EMBED].fwd_hooks) == 1  # 1 after adding
    model.remove_all_hook_fns()
    assert len(model.hook_dict[HOOK_EMBED].fwd_hooks) == 1  # permanent not removed without flag
    model.remove_all_hook_fns(including_permanent=True)
    assert len(model.hook_dict[HOOK_EMBED].fwd_hooks) == 0  # removed now
    model.run_with_hooks(ids, canvas, fwd_hooks=[])
    assert c.count == 0
    model.remove_all_hook_fns(including_permanent=True)


def test_conditional_hooks(setup):
    """Test that it's only possible to add certain hooks when certain conditions are met"""
    model, ids, canvas = setup

    def identity_hook(z, hook):
        return z

    for hook_name, set_use_hook_function in [
        ("decoder.blocks.0.attn.hook_result", model.set_use_attn_result),
    ]:
        model.reset_hooks()
        set_use_hook_function(False)
        # Ensure that we get an error when we inappropriately add a hook
        with pytest.raises(ValueError):
            model.add_hook(hook_name, identity_hook)

        # Ensure we DON'T get an error when we add a hook properly
        set_use_hook_function(True)
        model.add_hook(hook_name, identity_hook)

        # Reset the flag
        set_use_hook_function(False)


@pytest.mark.parametrize(
    "zero_attach_pos,prepend",
    [(zero_attach_pos, prepend) for zero_attach_pos in range(2) for prepend in [True, False]],
)
def test_prepending_hooks(setup, zero_attach_pos, prepend):
    """Add two hooks to a model: one that sets last layer activations to all 0s
    One that sets them to random noise.

    If the last activations are 0, then the logits will just be the model's logit bias.
    This is not true if the last activations are random noise.

    This test tests the prepending functionality by ensuring this property holds!"""
    model, ids, canvas = setup
    last = f"decoder.blocks.{model.cfg.num_hidden_layers - 1}.hook_resid_post"

    def set_to_zero(z, hook):
        z[:] = 0.0
        return z

    def set_to_randn(z, hook):
        z = torch.randn_like(z) * 0.1
        return z

    model.reset_hooks()

    for hook_idx in range(2):
        model.add_hook(
            last,
            set_to_zero if hook_idx == zero_attach_pos else set_to_randn,
            prepend=prepend,
        )
    logits = model(ids, canvas)

    logits_are_unembed_bias = (zero_attach_pos == 1) != prepend
    # the logits should be equal to the unembed bias
    # exactly when the zero hook is attached last XOR it is prepended

    assert torch.allclose(logits, model.b_U[None, :]) == logits_are_unembed_bias
