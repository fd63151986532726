"""Port of TransformerLens's tests/acceptance/test_activation_cache.py (TransformerLensOrg/TransformerLens at
commit 4cd36aaeb5dad931d085bd5d46a12b402fe15272): the tests of the cache's own API, assertions unchanged.

Adaptations: solu-2l / attn-only-2l become the shipped toy model, TL's IOI prompts become eight toy prompts
of one length (the positions read are canvas positions of a seeded canvas, as `pos_slice` picks them), and
`Slice(x)` is the plain selector `x`. Hook names carry the `decoder.` prefix. TL's `("scale", l, "ln1")` is
the scale of `ln1_post` (the pre-norms have no scale hook). `remove_batch_dim` on a larger batch raises
ValueError where TL asserts. `model.blocks[l].mlp.W_out` is `model.W_out[l]`. TL's `utils` module is
`diffusionlens.hooks.names` (imported as `utils`).

One marked difference: with `incl_remainder`, TL's `layer=0` reads the remainder from `resid_post` of layer
`0 - 1`, Python's last layer; here `layer=0` is block 0's input, so the remainder is `resid_pre` of block 0.

Not ported: the tests of `logit_attrs` against GPT-2 reference code, `accumulated_resid` / `apply_ln_to_stack`
with `recompute_ln` and `mlp_input` (pre-norm scales, which this model does not cache),
`decompose_resid(mlp_input=True)`, `get_full_resid_decomposition`'s GPT-2 component order (heads, MLPs,
embed, pos_embed, bias; here: embed, self_cond, then per block heads, MLP, experts), and `project_output_onto`.
"""

import pytest
import torch

prompts = ["squares 4 8:", "squares 1 2:", "squares 3 9:", "squares 7 5:"] * 2


@pytest.fixture(scope="module")
def run(toy):
    model = toy
    tokens = model.to_tokens(prompts)
    canvas = torch.randint(
        0, model.cfg.vocab_size, (len(prompts), model.cfg.canvas_length), generator=torch.Generator().manual_seed(0)
    )

    def run_with_cache(batch=slice(None), **kwargs):
        with torch.no_grad():
            return model.run_with_cache(tokens[batch], canvas[batch], **kwargs)[1]

    return model, run_with_cache


@pytest.fixture(scope="module")
def cache(run):
    return run[1]()


@torch.no_grad
def test_decompose_resid_with_apply_ln(cache):
    # Get decomposed resid and apply ln seperately (cribbed notebook code)
    per_layer_residual = cache.decompose_resid(layer=-1, pos_slice=-1)
    ref_scaled_residual_stack = cache.apply_ln_to_stack(per_layer_residual, layer=-1, pos_slice=-1)

    # Get scaled_residual_stack using apply_ln parameter
    scaled_residual_stack = cache.decompose_resid(layer=None, pos_slice=-1, apply_ln=True)

    assert torch.isclose(ref_scaled_residual_stack, scaled_residual_stack, atol=1e-7).all()


@torch.no_grad
def test_stack_head_results_with_apply_ln(cache):
    # Get per head resid stack and apply ln seperately (cribbed notebook code)
    per_head_residual = cache.stack_head_results(layer=-1, pos_slice=-1)
    ref_scaled_residual_stack = cache.apply_ln_to_stack(per_head_residual, layer=None, pos_slice=-1)

    # Get scaled_residual_stack using apply_ln parameter
    scaled_residual_stack = cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True)

    assert torch.isclose(ref_scaled_residual_stack, scaled_residual_stack, atol=1e-7).all()


@torch.no_grad
def test_stack_head_results_including_remainder(run, cache):
    model = run[0]
    ref_resid_post = cache["resid_post", 0][None, :, -1]
    per_head_residual, labels = cache.stack_head_results(layer=1, pos_slice=-1, incl_remainder=True, return_labels=True)
    remainder = ref_resid_post - per_head_residual[:-1].sum(dim=0)
    assert torch.isclose(remainder, per_head_residual[-1]).all()
    assert labels[:-1] == [f"L0H{i}" for i in range(model.cfg.num_attention_heads)]
    assert labels[-1] == "remainder"

    per_head_residual, labels = cache.stack_head_results(
        layer=0, pos_slice=-1, incl_remainder=False, return_labels=True
    )
    assert torch.isclose(per_head_residual, torch.zeros_like(per_head_residual)).all()
    assert len(labels) == 0


REMAINDER_AT_LAYER_0 = pytest.mark.xfail(
    strict=True,
    reason="TL's layer=0 reads resid_post of layer -1 (Python's last layer); here layer=0 is block 0's input",
)


@REMAINDER_AT_LAYER_0
@torch.no_grad
@pytest.mark.parametrize("helper", ["stack_head_results", "stack_neuron_results"])
def test_remainder_at_layer_0_is_the_final_residual(cache, helper):
    ref_resid_post = cache["resid_post", -1][None, :, -1]
    stack, labels = getattr(cache, helper)(layer=0, pos_slice=-1, incl_remainder=True, return_labels=True)
    assert torch.isclose(ref_resid_post, stack, atol=1e-7).all()
    assert len(labels) == 1
    assert labels[-1] == "remainder"


@torch.no_grad
@pytest.mark.parametrize("helper", ["stack_head_results", "stack_neuron_results"])
def test_remainder_at_layer_0_is_block_0s_input(cache, helper):
    """What this library gives instead: before block 0, everything is remainder."""
    stack, labels = getattr(cache, helper)(layer=0, pos_slice=-1, incl_remainder=True, return_labels=True)
    assert torch.equal(cache["resid_pre", 0][None, :, -1], stack)
    assert labels == ["remainder"]


@torch.no_grad
def test_stack_neuron_results_with_apply_ln(cache):
    # Get neuron result stack and apply ln seperately
    neuron_result_stack = cache.stack_neuron_results(layer=-1, pos_slice=-1)
    ref_scaled_residual_stack = cache.apply_ln_to_stack(neuron_result_stack, layer=-1, pos_slice=-1)

    # Get scaled_residual_stack using apply_ln parameter
    scaled_residual_stack = cache.stack_neuron_results(layer=-1, pos_slice=-1, apply_ln=True)

    assert torch.isclose(ref_scaled_residual_stack, scaled_residual_stack, atol=1e-7).all()


@torch.no_grad
def test_stack_neuron_results_including_remainder(run, cache):
    model = run[0]
    ref_resid_post = cache["resid_post", 0][None, :, -1]
    neuron_result_stack, labels = cache.stack_neuron_results(
        layer=1, pos_slice=-1, incl_remainder=True, return_labels=True
    )
    remainder = ref_resid_post - neuron_result_stack[:-1].sum(dim=0)
    assert torch.isclose(remainder, neuron_result_stack[-1]).all()
    assert labels[:-1] == [f"L0N{i}" for i in range(model.cfg.intermediate_size)]
    assert labels[-1] == "remainder"

    neuron_result_stack, labels = cache.stack_neuron_results(
        layer=0, pos_slice=-1, incl_remainder=False, return_labels=True
    )
    assert torch.isclose(neuron_result_stack, torch.zeros_like(neuron_result_stack)).all()
    assert len(labels) == 0


@torch.no_grad
def test_stack_neuron_results_using_neuron_slice(cache):
    neuron_result_stack, labels = cache.stack_neuron_results(
        layer=1, pos_slice=-1, neuron_slice=[0, 1, 2], return_labels=True
    )
    assert labels == [f"L0N{i}" for i in range(3)]


@torch.no_grad
def test_remove_batch_dim(run):
    cache = run[1](slice(0, 1))

    assert cache.has_batch_dim
    shapes_before_removal = {key: cache.cache_dict[key].shape for key in cache.cache_dict}

    # Removing batch dim changes the shape of the cached tensors
    cache.remove_batch_dim()
    assert not cache.has_batch_dim
    assert all(shapes_before_removal[key][1:] == cache.cache_dict[key].shape for key in shapes_before_removal)

    # Removing batch dim again does not change anything
    with pytest.warns(UserWarning):
        cache.remove_batch_dim()
    assert not cache.has_batch_dim
    assert all(shapes_before_removal[key][1:] == cache.cache_dict[key].shape for key in shapes_before_removal)


@torch.no_grad
def test_remove_batch_dim_fails_if_batch_gt_1(run):
    cache = run[1]()

    assert cache.has_batch_dim
    with pytest.raises(ValueError):
        cache.remove_batch_dim()


@torch.no_grad
def test_retrieve_activations(run, cache):
    from diffusionlens.hooks import names as utils

    model = run[0]
    key = ("scale", 1, "ln1_post")
    str_key = utils.get_act_name(*key)
    assert torch.equal(cache[key], cache[str_key])

    key = ("scale", -1, "ln1_post")
    str_key = f"scale{model.cfg.num_hidden_layers - 1}ln1_post"
    assert torch.equal(cache[key], cache[str_key])

    key = ("k", -1, None)
    str_key = f"decoder.blocks.{model.cfg.num_hidden_layers - 1}.attn.hook_k"
    assert torch.equal(cache[key], cache[str_key])

    key = "embed"
    str_key = utils.get_act_name(key)
    assert torch.equal(cache[key], cache[str_key])

    key = ("embed", None)
    str_key = utils.get_act_name(*key)
    assert torch.equal(cache[key], cache[str_key])


@torch.no_grad
def test_get_items(cache):
    assert all(
        cache_key == cache_dict_key and torch.equal(cache_val, cache_dict_val)
        for (cache_key, cache_val), (cache_dict_key, cache_dict_val) in zip(
            cache.items(), cache.cache_dict.items(), strict=True
        )
    )


@torch.no_grad
def test_get_values(cache):
    assert all(
        torch.equal(cache_val, cache_dict_val)
        for cache_val, cache_dict_val in zip(cache.values(), cache.cache_dict.values(), strict=True)
    )


@torch.no_grad
def test_get_keys(cache):
    assert all(
        cache_key == cache_dict_key
        for cache_key, cache_dict_key in zip(cache.keys(), cache.cache_dict.keys(), strict=True)
    )


@torch.no_grad
def test_apply_slice_to_batch_dim(cache):
    assert cache.has_batch_dim
    batch_slice = (2, 4)
    new_cache = cache.apply_slice_to_batch_dim(batch_slice)

    assert new_cache.has_batch_dim
    assert all(torch.equal(cache[key][2:4], new_cache[key]) for key in cache.cache_dict)

    batch_slice = 2
    new_cache = cache.apply_slice_to_batch_dim(batch_slice)

    assert not new_cache.has_batch_dim
    assert all(torch.equal(cache[key][2], new_cache[key]) for key in cache.cache_dict)


@torch.no_grad
def test_toggle_autodiff(cache):
    assert not torch.is_grad_enabled()
    with pytest.warns(UserWarning):
        cache.toggle_autodiff(mode=True)
    assert torch.is_grad_enabled()


@torch.no_grad
def test_stack_activation(run, cache):
    model = run[0]
    stack = cache.stack_activation("scale", -1, "ln1_post")
    assert all(
        torch.equal(cache[("scale", layer, "ln1_post")], stack[layer]) for layer in range(model.cfg.num_hidden_layers)
    )

    stack = cache.stack_activation("scale", 1, "ln1_post")
    assert all(torch.equal(cache[("scale", layer, "ln1_post")], stack[layer]) for layer in range(1))


@torch.no_grad
def test_compute_test_head_results_does_not_compute_results_twice(run):
    cache = run[1]()

    assert "decoder.blocks.0.attn.hook_result" not in cache.cache_dict
    cache.compute_head_results()
    assert "decoder.blocks.0.attn.hook_result" in cache.cache_dict

    # set infinity to the first element of the head results
    assert cache.cache_dict["decoder.blocks.0.attn.hook_result"][0, 0, 0, 0] != float("inf")
    cache.cache_dict["decoder.blocks.0.attn.hook_result"][0, 0, 0, 0] = float("inf")
    cache.compute_head_results()

    # assert the value has not changed
    assert cache.cache_dict["decoder.blocks.0.attn.hook_result"][0, 0, 0, 0] == float("inf")


@torch.no_grad
def test_get_neuron_results(run, cache):
    model = run[0]
    layer = 1
    ref_neuron_acts = cache[f"decoder.blocks.{layer}.mlp.hook_post"][:, -1, :2, None] * model.W_out[layer][:2]

    neuron_acts = cache.get_neuron_results(
        layer,
        neuron_slice=[0, 1],
        pos_slice=-1,
    )

    assert torch.isclose(ref_neuron_acts, neuron_acts).all()


@torch.no_grad
def test_get_neuron_results_without_slice(run, cache):
    model = run[0]
    layer = 1
    ref_neuron_acts = cache[f"decoder.blocks.{layer}.mlp.hook_post"][..., None] * model.W_out[layer]

    neuron_acts = cache.get_neuron_results(
        layer,
        neuron_slice=None,
        pos_slice=None,
    )

    assert torch.equal(ref_neuron_acts, neuron_acts)
