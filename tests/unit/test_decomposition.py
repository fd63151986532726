"""Attribution below the residual: every decomposition sums exactly to what it explains.

Random configs with every tensor randomised (norm gains and layer scalars around 1 with real spread, so
a skipped norm, a missing scalar or a head/expert mix-up shows), float64 to 1e-10 and float32 to 1e-5.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from random_models import CFG, random_model

from diffusionlens.cache.activation import ActivationCache
from diffusionlens.components import norms as norms_module
from diffusionlens.components.moe import _grouped_mm_available
from diffusionlens.sampling import ReplayNoise

TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-5)}


def run_all(model, ids, canvas, self_cond, **kwargs):
    model.set_use_attn_result(True)
    model.set_use_expert_outputs(True)
    try:
        with torch.no_grad():
            return model.run_with_cache(ids, canvas, self_cond, **kwargs)
    finally:
        model.set_use_attn_result(False)
        model.set_use_expert_outputs(False)


@pytest.fixture(scope="module", params=[torch.float64, torch.float32], ids=["float64", "float32"])
def setup(request):
    dtype = request.param
    model = random_model(dtype)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, CFG.vocab_size, (2, 7), generator=g)
    canvas = torch.randint(0, CFG.vocab_size, (2, CFG.canvas_length), generator=g)
    self_cond = torch.randn(2, CFG.canvas_length, CFG.vocab_size, generator=g, dtype=torch.float64).float()
    with pytest.MonkeyPatch.context() as patch:
        if dtype == torch.float64:
            # RMSNorm computes in fp32 by design; float64 norms let the float64 checks reach 1e-10.
            patch.setattr(norms_module, "COMPUTE_DTYPE", torch.float64)
        logits, cache = run_all(model, ids, canvas, self_cond)
        # The same pass without hook_result: head results come from hook_z.
        _, z_cache = run_all(model, ids, canvas, self_cond, names_filter=lambda n: "hook_result" not in n)
    return SimpleNamespace(
        model=model, cache=cache, z_cache=z_cache, logits=logits, ids=ids, canvas=canvas, tol=TOL[dtype]
    )


def close(actual: torch.Tensor, expected: torch.Tensor, tol: dict) -> None:
    torch.testing.assert_close(actual, expected.to(actual.dtype), **tol)


def norm_map(s, name: str) -> torch.Tensor:
    gain = s.model.get_submodule(name).weight
    scale = s.cache[f"{name}.hook_scale"]
    return scale if gain is None else scale * gain.detach().to(scale.dtype)


# ---------------------------------------------------------------------- the hooks themselves
@pytest.mark.parametrize("stack", ["encoder", "decoder"])
def test_heads_through_the_cached_scale_give_attn_out(setup, stack):
    s = setup
    for layer in range(CFG.num_hidden_layers):
        p = f"{stack}.blocks.{layer}"
        attn = s.cache[f"{p}.attn.hook_result"].sum(2) + s.model.get_submodule(f"{p}.attn.o_proj").bias
        close(attn * norm_map(s, f"{p}.ln1_post"), s.cache[f"{p}.hook_attn_out"], s.tol)


@pytest.mark.parametrize("stack", ["encoder", "decoder"])
def test_experts_and_neurons_through_their_scales_give_ffn_out(setup, stack):
    s = setup
    for layer in range(CFG.num_hidden_layers):
        p = f"{stack}.blocks.{layer}"
        W_out = s.model.get_submodule(f"{p}.mlp.down_proj").weight
        mlp = torch.einsum("bpn,dn->bpd", s.cache[f"{p}.mlp.hook_post"], W_out) * norm_map(s, f"{p}.ln2_post_mlp")
        moe = s.cache[f"{p}.moe.hook_expert_out"].sum(2) * norm_map(s, f"{p}.ln2_post_moe")
        close((mlp + moe) * norm_map(s, f"{p}.ln2_post"), s.cache[f"{p}.hook_ffn_out"], s.tol)


def test_final_norm_scale_unembedded_gives_the_pre_softcap_logits(setup):
    s = setup
    resid = s.cache[f"decoder.blocks.{CFG.num_hidden_layers - 1}.hook_resid_post"]
    W_E = s.model.decoder.embed.W_E.detach()
    pre_cap = (resid * norm_map(s, "decoder.ln_final")) @ W_E.T
    cap = CFG.final_logit_softcapping
    close(torch.tanh(pre_cap.float() / cap) * cap, s.logits, s.tol)
    close(pre_cap, s.cache["decoder.ln_final.hook_normalized"] @ W_E.T, s.tol)


# ---------------------------------------------------------------------- decompositions
@pytest.mark.parametrize("stack", ["encoder", "decoder"])
@pytest.mark.parametrize("expand_neurons,expand_experts", [(False, True), (True, False), (True, True)])
def test_full_decomposition_sums_to_the_residual_at_every_layer(setup, stack, expand_neurons, expand_experts):
    s = setup
    n = CFG.num_hidden_layers
    for layer in range(n + 1):
        parts, labels = s.cache.get_full_resid_decomposition(
            layer, expand_neurons=expand_neurons, expand_experts=expand_experts, return_labels=True, stack=stack
        )
        assert len(labels) == parts.shape[0] == len(set(labels))
        expected = s.cache[
            f"{stack}.blocks.{layer}.hook_resid_pre" if layer < n else f"{stack}.blocks.{n - 1}.hook_resid_post"
        ]
        close(parts.sum(0), expected, s.tol)
    per_block = 4 + 1 + (CFG.intermediate_size if expand_neurons else 1) + (CFG.num_experts if expand_experts else 1)
    assert len(labels) == (2 if stack == "decoder" else 1) + n * per_block
    assert labels[:2] == (["embed", "self_cond"] if stack == "decoder" else ["embed", "L0H0"])


def test_self_conditioning_is_its_own_component(setup):
    s = setup
    parts, labels = s.cache.get_full_resid_decomposition(0, return_labels=True)
    assert labels == ["embed", "self_cond"]
    assert parts[1].abs().max() > 0.01  # the model was given self-conditioning logits


def test_partial_stacks_plus_remainder_give_the_residual(setup):
    s = setup
    final = s.cache[f"decoder.blocks.{CFG.num_hidden_layers - 1}.hook_resid_post"]
    for stack_fn in (s.cache.stack_head_results, s.cache.stack_neuron_results, s.cache.stack_expert_results):
        parts, labels = stack_fn(incl_remainder=True, return_labels=True)
        assert labels[-1] == "remainder"
        close(parts.sum(0), final, s.tol)
    heads = s.cache.stack_head_results(layer=2, return_labels=True)[1]
    assert heads == [
        label for layer in (0, 1) for label in [*(f"L{layer}H{h}" for h in range(4)), f"L{layer}_attn_bias"]
    ]


def test_experts_by_slot_and_by_expert_agree(setup):
    s = setup
    by_expert, expert_labels = s.cache.stack_expert_results(return_labels=True)
    by_slot, slot_labels = s.cache.stack_expert_results(by="slot", return_labels=True)
    assert expert_labels[:3] == ["L0E0", "L0E1", "L0E2"] and slot_labels[:2] == ["L0_slot0", "L0_slot1"]
    close(by_expert.sum(0), by_slot.sum(0), s.tol)
    # An expert a token did not route to contributes exactly zero there.
    chosen = s.cache["decoder.blocks.0.moe.hook_expert_indices"]
    for e in range(CFG.num_experts):
        unused = ~(chosen == e).any(-1)
        assert (by_expert[e][unused] == 0).all()


def test_neuron_slice_picks_neurons(setup):
    s = setup
    all_neurons = s.cache.stack_neuron_results(layer=1)
    some, labels = s.cache.stack_neuron_results(layer=1, neuron_slice=[3, 7], return_labels=True)
    assert labels == ["L0N3", "L0N7"]
    close(some, all_neurons[[3, 7]], s.tol)
    one, labels = s.cache.stack_neuron_results(layer=1, neuron_slice=5, return_labels=True)
    assert labels == ["L0N5"]
    close(one[0], all_neurons[5], s.tol)


def test_apply_ln_and_logit_attrs_explain_the_pre_softcap_logits(setup):
    s = setup
    W_E = s.model.decoder.embed.W_E.detach()
    pre_cap = s.cache["decoder.ln_final.hook_normalized"] @ W_E.T
    parts = s.cache.get_full_resid_decomposition()
    close((s.cache.apply_ln_to_stack(parts).sum(0)) @ W_E.T, pre_cap, s.tol)
    close(
        s.cache.get_full_resid_decomposition(apply_ln=True).sum(0), s.cache["decoder.ln_final.hook_normalized"], s.tol
    )
    # One token everywhere, a token per position, and a difference of tokens at one position.
    close(s.cache.logit_attrs(parts, 7).sum(0), pre_cap[..., 7], s.tol)
    tokens = s.canvas
    per_pos = pre_cap.gather(-1, tokens[..., None])[..., 0]
    close(s.cache.logit_attrs(parts, tokens).sum(0), per_pos, s.tol)
    at_2 = s.cache.logit_attrs(parts[:, :, 2], tokens[:, 2], incorrect_tokens=tokens[:, 0], pos_slice=2)
    close(
        at_2.sum(0),
        pre_cap[:, 2].gather(-1, tokens[:, 2:3])[:, 0] - pre_cap[:, 2].gather(-1, tokens[:, :1])[:, 0],
        s.tol,
    )
    # Sliced stacks and one batch item.
    sliced = s.cache.get_full_resid_decomposition(pos_slice=[1, 3])
    close(s.cache.logit_attrs(sliced, 7, pos_slice=[1, 3]).sum(0), pre_cap[:, [1, 3], 7], s.tol)
    one = s.cache.logit_attrs(parts[:, 1], 7, batch_slice=1, has_batch_dim=False)
    close(one.sum(0), pre_cap[1, :, 7], s.tol)


def test_decompose_resid_apply_ln_uses_the_cached_final_scale(setup):
    """As TransformerLens: the final norm with its cached scale is linear, so the normed parts sum to
    ln_final's output (renormalising each part separately would not)."""
    s = setup
    normalized = s.cache["decoder.ln_final.hook_normalized"]
    close(s.cache.decompose_resid(apply_ln=True).sum(0), normalized, s.tol)
    close(s.cache.decompose_resid(apply_ln=True, pos_slice=3).sum(0), normalized[:, 3], s.tol)
    close(s.cache.decompose_resid(apply_ln=True, pos_slice=[4, 1]).sum(0), normalized[:, [4, 1]], s.tol)
    with pytest.raises(ValueError, match=r"needs the final residual \(layer=None\), not layer=1"):
        s.cache.decompose_resid(layer=1, apply_ln=True)


def test_batch_slice_gives_each_row_its_own_final_scale(setup):
    """As TransformerLens, batch_slice slices the stack's batch axis and the cached scale alike."""
    s = setup
    normalized = s.cache["decoder.ln_final.hook_normalized"]
    pre_cap = normalized @ s.model.decoder.embed.W_E.detach().T
    full = s.cache.get_full_resid_decomposition()
    close(s.cache.apply_ln_to_stack(full, batch_slice=1).sum(0), normalized[1], s.tol)
    close(s.cache.apply_ln_to_stack(full, batch_slice=[1, 0]).sum(0), normalized[[1, 0]], s.tol)
    close(s.cache.apply_ln_to_stack(full[:, :, 2], batch_slice=(1, 2), pos_slice=2).sum(0), normalized[1:2, 2], s.tol)
    close(s.cache.logit_attrs(full, 7, batch_slice=1).sum(0), pre_cap[1, :, 7], s.tol)
    with pytest.raises(ValueError, match="unsliced stack"):
        s.cache.apply_ln_to_stack(full[:, 1:], batch_slice=[0])
    with pytest.raises(ValueError, match=r"batch_slice=<row>"):
        s.cache.apply_ln_to_stack(full[:, 1], has_batch_dim=False)


def test_tokens_to_residual_directions_are_unembedding_columns(setup):
    s = setup
    W_E = s.model.decoder.embed.W_E
    assert torch.equal(s.model.tokens_to_residual_directions(5), W_E[5])
    assert torch.equal(s.model.tokens_to_residual_directions(s.canvas), W_E[s.canvas])
    with pytest.raises(TypeError, match="ids"):
        s.model.tokens_to_residual_directions(torch.ones(2))


def test_compute_head_results_matches_the_recorded_hook(setup):
    s = setup
    names = lambda n: n.endswith("hook_z")  # noqa: E731
    with torch.no_grad():
        _, cache = s.model.run_with_cache(s.ids, s.canvas, names_filter=names)
    cache.compute_head_results()
    assert "encoder.blocks.1.attn.hook_result" in cache and "decoder.blocks.2.attn.hook_result" in cache
    recorded = run_all(s.model, s.ids, s.canvas, None, names_filter=lambda n: n.endswith("hook_result"))[1]
    for name in recorded:
        close(cache[name], recorded[name], s.tol)


def test_head_results_are_computed_on_demand_from_hook_z(setup):
    """As TransformerLens's cache: without hook_result, stack_head_results and the full decomposition
    compute each head's output from the cached hook_z, for the kept positions only."""
    s = setup
    cache = s.z_cache
    recorded, labels = s.cache.stack_head_results(return_labels=True)
    on_demand, same_labels = cache.stack_head_results(return_labels=True)
    assert same_labels == labels and not any(n.endswith("hook_result") for n in cache)
    close(on_demand, recorded, s.tol)
    close(cache.stack_head_results(pos_slice=[3, 1]), recorded[:, :, [3, 1]], s.tol)
    close(cache.get_full_resid_decomposition(), s.cache.get_full_resid_decomposition(), s.tol)


def test_expert_outputs_are_computed_on_demand_from_the_moe_inputs(setup):
    """Without hook_expert_out, the experts' outputs come from the cached ln2_moe output, routing weights
    and chosen experts, run through the block's own experts."""
    s = setup
    store = {name: value for name, value in s.cache.items() if not name.endswith("hook_expert_out")}
    cache = ActivationCache(store, s.model)
    recorded, labels = s.cache.stack_expert_results(return_labels=True)
    on_demand, same_labels = cache.stack_expert_results(return_labels=True)
    assert same_labels == labels
    close(on_demand, recorded, s.tol)
    close(
        cache.stack_expert_results(by="slot", pos_slice=[4, 2]),
        s.cache.stack_expert_results(by="slot")[:, :, [4, 2]],
        s.tol,
    )
    close(cache.get_full_resid_decomposition(), s.cache.get_full_resid_decomposition(), s.tol)


def test_pos_slice_selects_before_building_and_an_int_drops_the_axis(setup):
    s = setup
    full, labels = s.cache.get_full_resid_decomposition(expand_neurons=True, return_labels=True)
    for pos_slice, expected in ((2, full[:, :, 2]), (-1, full[:, :, -1]), ([4, 0], full[:, :, [4, 0]])):
        close(s.cache.get_full_resid_decomposition(expand_neurons=True, pos_slice=pos_slice), expected, s.tol)
    close(
        s.cache.stack_expert_results(pos_slice=1, incl_remainder=True),
        s.cache.stack_expert_results(incl_remainder=True)[:, :, 1],
        s.tol,
    )
    # Built from sliced values: every stack the helper concatenates already has one position.
    built = []
    original_cat = torch.cat

    def recording_cat(tensors, *args, **kwargs):
        out = original_cat(tensors, *args, **kwargs)
        built.append(out.shape)
        return out

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "cat", recording_cat)
        s.cache.get_full_resid_decomposition(expand_neurons=True, pos_slice=2)
    assert built and all(shape[-2] == 1 for shape in built)


def test_model_weights_shortcut(setup):
    weights = setup.model.weights(fold_norm_gains=True)
    assert len(weights.blocks) == CFG.num_hidden_layers
    assert weights.blocks[0].stack == "decoder" and weights.blocks[0].folded
    assert setup.model.weights("encoder").blocks[1].stack == "encoder"


# ---------------------------------------------------------------------- bad input
def test_missing_hooks_and_bad_layers_say_what_to_do(setup):
    s = setup
    with torch.no_grad():
        _, cache = s.model.run_with_cache(
            s.ids,
            s.canvas,
            names_filter=lambda n: "hook_result" not in n and not n.endswith(("hook_z", "hook_expert_weights")),
        )
    with pytest.raises(KeyError, match=r"hook_z.*set_use_attn_result\(True\)"):
        cache.stack_head_results()
    with pytest.raises(KeyError, match=r"hook_expert_out.*set_use_expert_outputs\(True\).*hook_expert_weights"):
        cache.stack_expert_results()
    _, bare = s.model.run_with_cache(s.ids, s.canvas, names_filter="decoder.blocks.*.hook_resid_*")
    with pytest.raises(KeyError, match=r"ln_final.hook_scale' is not in this cache: record it"):
        bare.apply_ln_to_stack(torch.zeros(1, 2, 5, CFG.hidden_size))
    with pytest.raises(ValueError, match=r"layer=4 is out of range: a residual-stream layer is 0\.\.3"):
        s.cache.get_full_resid_decomposition(layer=4)
    with pytest.raises(ValueError, match="final norm only"):
        s.cache.apply_ln_to_stack(torch.zeros(1, 2, 5, CFG.hidden_size), layer=1)
    with pytest.raises(ValueError, match="stack must be one of"):
        s.cache.stack_head_results(stack="prompt")
    with pytest.raises(ValueError, match="by must be"):
        s.cache.stack_expert_results(by="token")


# ---------------------------------------------------------------------- the forward pass is untouched
def test_new_hooks_leave_outputs_bit_identical_and_replacements_take_effect():
    model = random_model(torch.float32)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, CFG.vocab_size, (2, 6), generator=g)
    canvas = torch.randint(0, CFG.vocab_size, (2, CFG.canvas_length), generator=g)
    with torch.no_grad():
        plain = model(ids, canvas)
        logits, cache = run_all(model, ids, canvas, None)
        assert torch.equal(logits, plain)
        assert "decoder.blocks.0.attn.hook_result" in cache and "decoder.ln_final.hook_scale" in cache
        model.set_use_attn_result(True)
        zeroed = model.run_with_hooks(
            ids, canvas, fwd_hooks=[("decoder.blocks.1.attn.hook_result", lambda x, h: torch.zeros_like(x))]
        )
        model.set_use_attn_result(False)
        # Zeroing every head leaves only the o_proj bias: the same as zeroing z.
        zero_z = model.run_with_hooks(
            ids, canvas, fwd_hooks=[("decoder.blocks.1.attn.hook_z", lambda x, h: torch.zeros_like(x))]
        )
        torch.testing.assert_close(zeroed, zero_z)
        assert not torch.allclose(zeroed, plain, atol=1e-3)

        # (Scaling every slot alike would do nothing: the MoE post-norm is scale-invariant.)
        def drop_second_slot(x, hook):
            return torch.cat((x[..., :1, :], torch.zeros_like(x[..., 1:, :])), dim=-2)

        model.set_use_expert_outputs(True)
        one_slot = model.run_with_hooks(
            ids, canvas, fwd_hooks=[("decoder.blocks.0.moe.hook_expert_out", drop_second_slot)]
        )
        model.set_use_expert_outputs(False)
        assert not torch.allclose(one_slot, plain, atol=1e-3)


def test_grouped_mm_is_not_offered_float64():
    assert not _grouped_mm_available(torch.zeros(2, 2, 2, dtype=torch.float64))


def test_step_caches_of_a_generation_decompose_too():
    model = random_model(torch.float32)
    ids = torch.randint(3, CFG.vocab_size, (1, 6), generator=torch.Generator().manual_seed(9))
    model.set_use_attn_result(True)
    model.set_use_expert_outputs(True)
    try:
        _, cache = model.generate_with_cache(
            ids,
            max_new_tokens=CFG.canvas_length,
            max_denoising_steps=3,
            noise=ReplayNoise(1),
            progress=False,
            eos_token_id=None,
        )
    finally:
        model.set_use_attn_result(False)
        model.set_use_expert_outputs(False)
    step = cache.step_cache(1)
    final = step[f"decoder.blocks.{CFG.num_hidden_layers - 1}.hook_resid_post"]
    torch.testing.assert_close(step.get_full_resid_decomposition().sum(0), final, **TOL[torch.float32])
    prompt = step.get_full_resid_decomposition(stack="encoder").sum(0)
    torch.testing.assert_close(
        prompt, step[f"encoder.blocks.{CFG.num_hidden_layers - 1}.hook_resid_post"], **TOL[torch.float32]
    )
