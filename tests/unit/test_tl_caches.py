"""TransformerLens cache habits, as written: caches are mappings with TL tuple keys, get_act_name,
run_with_cache(remove_batch_dim=, pos_slice=), accumulated_resid's layer semantics, bf16 lenses,
step_cache errors and pickling."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from tolerance import readout_atol, summed_parts_atol

from diffusionlens import ActivationCache, DenoisingCache, ReplayNoise, hook_specs
from diffusionlens.hooks.names import get_act_name

GEN = dict(max_denoising_steps=4, noise=ReplayNoise(1), progress=False, eos_token_id=None)
RESIDS = ["*.blocks.*.hook_resid_pre", "*.blocks.*.hook_resid_mid", "*.blocks.*.hook_resid_post"]


@pytest.fixture(scope="module")
def one_pass(toy_pass):
    model, ids, canvas = toy_pass
    with torch.no_grad():
        return model.run_with_cache(ids, canvas)


@pytest.fixture(scope="module")
def generation(toy_pass):
    model, ids, _ = toy_pass
    names = [*RESIDS, "decoder.hook_logits", "decoder.self_cond.hook_logits_in", "encoder.hook_embed"]
    return model.generate_with_cache(
        ids, names_filter=names, steps=[0, 1], max_new_tokens=model.cfg.canvas_length, **GEN
    )


# ---------------------------------------------------------------------- get_act_name
@pytest.mark.parametrize(
    ("args", "kwargs", "full"),
    [
        (("resid_post", 3), {}, "decoder.blocks.3.hook_resid_post"),
        (("resid_pre", 0), {"stack": "encoder"}, "encoder.blocks.0.hook_resid_pre"),
        (("resid_mid", 2, "encoder"), {}, "encoder.blocks.2.hook_resid_mid"),
        (("attn_out", 1), {}, "decoder.blocks.1.hook_attn_out"),
        (("mlp_out", 1), {}, "decoder.blocks.1.hook_mlp_out"),
        (("moe_out", 1), {}, "decoder.blocks.1.hook_moe_out"),
        (("ffn_out", 1), {}, "decoder.blocks.1.hook_ffn_out"),
        (("pattern", 2), {}, "decoder.blocks.2.attn.hook_pattern"),
        (("attn", 2), {}, "decoder.blocks.2.attn.hook_pattern"),
        (("attn_scores", 2), {}, "decoder.blocks.2.attn.hook_attn_scores"),
        (("attn_logits", 2), {}, "decoder.blocks.2.attn.hook_attn_scores"),
        (("q", 0), {}, "decoder.blocks.0.attn.hook_q"),
        (("k", 0, "attn"), {}, "decoder.blocks.0.attn.hook_k"),
        (("v", 0, "a"), {}, "decoder.blocks.0.attn.hook_v"),
        (("z", 0), {}, "decoder.blocks.0.attn.hook_z"),
        (("rot_q", 0), {}, "decoder.blocks.0.attn.hook_rot_q"),
        (("rot_k", 0), {}, "decoder.blocks.0.attn.hook_rot_k"),
        (("pre", 4), {}, "decoder.blocks.4.mlp.hook_pre"),
        (("mlp_post", 4), {}, "decoder.blocks.4.mlp.hook_post"),
        (("normalized", 3, "ln1"), {}, "decoder.blocks.3.ln1.hook_normalized"),
        (("ln2", 3), {}, "decoder.blocks.3.ln2.hook_normalized"),
        (("router_logits", 5), {}, "decoder.blocks.5.moe.hook_router_logits"),
        (("embed",), {}, "decoder.hook_embed"),
        (("embed",), {"stack": "encoder"}, "encoder.hook_embed"),
        (("logits",), {}, "decoder.hook_logits"),
        (("scale",), {}, "decoder.ln_final.hook_scale"),
        (("scale", 3, "ln1_post"), {}, "decoder.blocks.3.ln1_post.hook_scale"),
        (("scale", 0, "ln2_post"), {"stack": "encoder"}, "encoder.blocks.0.ln2_post.hook_scale"),
        (("normalized",), {}, "decoder.ln_final.hook_normalized"),
        (("decoder.self_cond.hook_out",), {}, "decoder.self_cond.hook_out"),
    ],
)
def test_get_act_name_matches_real_hooks(toy_pass, args, kwargs, full):
    assert get_act_name(*args, **kwargs) == full
    assert full in toy_pass[0].hook_dict


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (("resid_psot", 3), {}, KeyError, "resid_post"),
        (("scale", 3), {}, ValueError, r"'scale' inside a block needs layer_type, one of \['ln1_post'"),
        (("scale", 3, "ln1"), {}, ValueError, "the pre-norms .* do not"),
        (("resid_post",), {}, ValueError, "layer="),
        (("embed", 2), {}, ValueError, "drop layer"),
        (("normalized", 2), {}, ValueError, "ln1"),
        (("logits",), {"stack": "encoder"}, KeyError, "only the decoder"),
        (("resid_post", 2), {"stack": "middle"}, ValueError, "stack must be one of 'encoder', 'decoder'"),
        (("resid_post", -1), {}, ValueError, "negative layers"),
        (("resid_post", "3"), {}, TypeError, "layer must be an int"),
    ],
)
def test_get_act_name_refuses_bad_names(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        get_act_name(*args, **kwargs)


# ---------------------------------------------------------------------- ActivationCache as a mapping
def test_activation_cache_is_a_mapping_with_tl_keys(toy_pass, one_pass):
    model, _, _ = toy_pass
    _, cache = one_pass
    n = model.cfg.num_hidden_layers
    assert (
        len(cache)
        == len(list(cache))
        == len(cache.keys())
        == len(model.hook_dict)
        - len([k for k in model.hook_dict if k.startswith("sampler.") or k == "decoder.self_cond.hook_logits_in"])
        # the per-head and per-expert outputs fire only after model.set_use_attn_result / set_use_expert_outputs
        - len([name for name, spec in hook_specs(model.cfg).items() if spec.opt_in])
    )
    name, value = next(iter(cache.items()))
    assert torch.equal(cache[name], value)
    assert torch.equal(cache["resid_post", 3], cache["decoder.blocks.3.hook_resid_post"])
    assert torch.equal(cache["resid_post", 3, "encoder"], cache["encoder.blocks.3.hook_resid_post"])
    assert torch.equal(cache["resid_post", -1], cache[f"decoder.blocks.{n - 1}.hook_resid_post"])
    assert torch.equal(cache["normalized", 2, "ln1"], cache["decoder.blocks.2.ln1.hook_normalized"])
    assert torch.equal(cache["embed"], cache["decoder.hook_embed"])
    assert ("resid_post", 3) in cache and ("resid_post", 99) not in cache and "nonsense" not in cache
    assert cache.get("decoder.sampler.missing") is None and cache.get(("resid_pre", 0)) is not None
    with pytest.raises(KeyError, match="out of range"):
        cache["resid_post", -(n + 1)]
    with pytest.raises(KeyError, match="Nearest"):
        cache["resid_psot", 1]


def test_remove_batch_dim_and_to(toy_pass):
    model, ids, canvas = toy_pass
    with torch.no_grad():
        _, cache = model.run_with_cache(ids, canvas, names_filter=RESIDS)
    full = cache["resid_post", 2].clone()
    assert cache.remove_batch_dim() is cache and not cache.has_batch_dim
    assert torch.equal(cache["resid_post", 2], full[0])
    assert cache.accumulated_resid().shape == (model.cfg.num_hidden_layers + 1, *full.shape[1:])
    with pytest.warns(UserWarning, match="already removed"):  # TransformerLens: a warning, nothing changes
        assert cache.remove_batch_dim() is cache
    assert torch.equal(cache["resid_post", 2], full[0])
    assert cache.to("cpu") is cache and cache["resid_post", 2].device.type == "cpu"
    with torch.no_grad():
        _, batched = model.run_with_cache(ids.repeat(2, 1), canvas.repeat(2, 1), names_filter=RESIDS)
    with pytest.raises(ValueError, match="batch size 1"):
        batched.remove_batch_dim()


# ---------------------------------------------------------------------- run_with_cache options
def test_run_with_cache_remove_batch_dim_and_pos_slice(toy_pass, one_pass):
    model, ids, canvas = toy_pass
    logits, full = one_pass
    with torch.no_grad():
        out, squeezed = model.run_with_cache(ids, canvas, remove_batch_dim=True)
        _, last = model.run_with_cache(ids, canvas, pos_slice=-1)
        _, window = model.run_with_cache(ids, canvas, pos_slice=(2, 5), remove_batch_dim=True)
    torch.testing.assert_close(out, logits)
    assert torch.equal(squeezed["resid_post", 1], full["resid_post", 1][0])
    # An int keeps a size-1 position axis, as TransformerLens.
    assert torch.equal(last["resid_post", 1], full["resid_post", 1][:, -1:])
    # The encoder's values index prompt positions, another axis: pos_slice leaves them whole.
    assert torch.equal(last["encoder.hook_embed"], full["encoder.hook_embed"])
    # Attention patterns keep every key and slice the queries, as TransformerLens.
    assert torch.equal(last["pattern", 1], full["pattern", 1][:, :, -1:])
    assert torch.equal(window["pattern", 1], full["pattern", 1][0, :, 2:5])
    assert torch.equal(window["q", 1], full["q", 1][0, 2:5])


def test_run_with_cache_pos_slice_past_the_prompt_length(toy_pass, one_pass):
    """A canvas position the prompt does not reach (TransformerLens's size-1 axis, the prompt untouched)."""
    model, ids, canvas = toy_pass
    _, full = one_pass
    position = ids.shape[1] + 3
    assert position < canvas.shape[1]
    with torch.no_grad():
        _, sliced = model.run_with_cache(ids, canvas, pos_slice=position)
    assert torch.equal(sliced["resid_pre", 2], full["resid_pre", 2][:, position : position + 1])
    assert torch.equal(sliced["resid_pre", 2, "encoder"], full["resid_pre", 2, "encoder"])


def test_run_with_cache_pos_slice_with_gradients(toy_pass):
    model, ids, canvas = toy_pass
    _, cache = model.run_with_cache(
        ids, canvas, names_filter="decoder.blocks.2.hook_resid_post", incl_bwd=True, loss_fn=lambda x: x[0, 3, 5]
    )
    _, sliced = model.run_with_cache(
        ids,
        canvas,
        names_filter="decoder.blocks.2.hook_resid_post",
        incl_bwd=True,
        loss_fn=lambda x: x[0, 3, 5],
        pos_slice=[3],
    )
    name = "decoder.blocks.2.hook_resid_post_grad"
    assert torch.equal(sliced[name], cache[name][:, [3]])


@pytest.mark.parametrize("bad", ["last", 1.5, torch.ones(2), torch.zeros(2, 2, dtype=torch.long), (1, 2, 3, 4), True])
def test_bad_pos_slice_is_refused_before_the_run(toy_pass, bad):
    model, ids, canvas = toy_pass
    calls = []
    model.add_hook("decoder.hook_embed", lambda x, hook: calls.append(1))
    try:
        with pytest.raises(TypeError, match="pos_slice must be"):
            model.run_with_cache(ids, canvas, pos_slice=bad)
    finally:
        model.reset_hooks()
    assert not calls


def test_run_with_cache_remove_batch_dim_refuses_batches(toy_pass):
    model, ids, canvas = toy_pass
    with pytest.raises(ValueError, match="batch size 1"):
        model.run_with_cache(ids.repeat(2, 1), canvas.repeat(2, 1), remove_batch_dim=True)
    with pytest.raises(TypeError, match="True or False"):
        model.run_with_cache(ids, canvas, remove_batch_dim="yes")


# ---------------------------------------------------------------------- accumulated_resid as TL
def test_accumulated_resid_layer_semantics_follow_tl(toy_pass, one_pass):
    model, _, _ = toy_pass
    _, cache = one_pass
    n = model.cfg.num_hidden_layers
    up_to_3, labels = cache.accumulated_resid(layer=3, return_labels=True)
    assert labels == ["0_pre", "1_pre", "2_pre", "3_pre"]
    assert torch.equal(up_to_3[-1], cache["resid_pre", 3])
    only_embed = cache.accumulated_resid(layer=0)
    assert only_embed.shape[0] == 1 and torch.equal(only_embed[0], cache["resid_pre", 0])
    everything, labels = cache.accumulated_resid(return_labels=True)
    assert labels[-1] == "final_post" and len(labels) == n + 1
    assert torch.equal(cache.accumulated_resid(layer=-1), everything)
    assert torch.equal(cache.accumulated_resid(layer=n), everything)
    assert torch.equal(cache.accumulated_resid(layer=-2), everything[:-1])
    with_mid, labels = cache.accumulated_resid(layer=2, incl_mid=True, return_labels=True)
    assert labels == ["0_pre", "0_mid", "1_pre", "1_mid", "2_pre"]
    assert torch.equal(with_mid[1], cache["resid_mid", 0])
    assert torch.equal(cache.accumulated_resid(pos_slice=-1), everything[:, :, -1])
    encoder = cache.accumulated_resid(layer=1, stack="encoder")
    assert torch.equal(encoder[1], cache["resid_pre", 1, "encoder"])
    normed = cache.accumulated_resid(layer=2, apply_ln=True)
    torch.testing.assert_close(normed, model.decoder.ln_final(up_to_3[:3]))
    with pytest.raises(ValueError, match=r"layer=7 is out of range: a residual-stream layer is 0\.\.6 .* or -7\.\.-1"):
        cache.accumulated_resid(layer=7)
    with pytest.raises(TypeError, match="stack='encoder' by keyword"):
        cache.accumulated_resid("encoder")


def test_decompose_resid_and_logit_lens_take_tl_arguments(toy_pass, one_pass):
    model, _, _ = toy_pass
    logits, cache = one_pass
    parts, labels = cache.decompose_resid(layer=2, return_labels=True)
    assert labels == ["embed", "0_attn_out", "0_ffn_out", "1_attn_out", "1_ffn_out"]
    torch.testing.assert_close(parts.sum(0), cache["resid_pre", 2], rtol=0, atol=summed_parts_atol(parts))
    attn_only, labels = cache.decompose_resid(layer=2, mode="attn", incl_embeds=False, return_labels=True)
    assert labels == ["0_attn_out", "1_attn_out"] and torch.equal(attn_only, parts[[1, 3]])
    assert torch.equal(cache.decompose_resid(pos_slice=-1), cache.decompose_resid()[:, :, -1])
    lens = cache.logit_lens(layer=2)
    assert lens.shape[0] == 3
    atol = readout_atol(model, logits)
    torch.testing.assert_close(cache.logit_lens()[-1], logits, rtol=0, atol=atol)
    torch.testing.assert_close(cache.logit_lens(pos_slice=-1)[-1], logits[:, -1], rtol=0, atol=atol)
    with pytest.raises(ValueError, match="mode must be"):
        cache.decompose_resid(mode="heads")


# ---------------------------------------------------------------------- DenoisingCache
def test_denoising_cache_is_a_mapping(toy_pass, generation):
    model, _, _ = toy_pass
    _, cache = generation
    keys = cache.keys()
    # The self-conditioning input does not fire at step 0, so it has no step axis: not a key.
    assert "decoder.self_cond.hook_logits_in" not in keys and "decoder.self_cond.hook_logits_in" not in cache
    assert "decoder.hook_logits" in keys and "encoder.hook_embed" in keys
    assert list(cache) == keys and len(cache) == len(keys)
    values = dict(cache.items())
    assert set(values) == set(keys) and len(list(cache.values())) == len(keys)
    assert values["decoder.hook_logits"].shape[0] == 2  # recorded steps 0, 1
    assert torch.equal(cache["resid_post", 3], cache["decoder.blocks.3.hook_resid_post"])
    assert torch.equal(cache["resid_pre", 1, "encoder"], cache["encoder.blocks.1.hook_resid_pre"])
    assert ("resid_post", 3) in cache
    assert torch.equal(cache.get(("resid_post", -1), step=1), cache["decoder.blocks.5.hook_resid_post"][1])
    with pytest.raises(KeyError, match="did not fire at recorded steps"):
        cache["decoder.self_cond.hook_logits_in"]
    assert cache.get("decoder.self_cond.hook_logits_in", step=1).shape[-1] == model.cfg.vocab_size
    with pytest.raises(TypeError, match="step_cache"):
        cache.remove_batch_dim()
    assert cache.to("cpu") is cache


def test_step_cache_of_an_unrecorded_step_names_the_recorded_steps(generation):
    _, cache = generation
    with pytest.raises(KeyError, match=r"step 3 of canvas 0 was not recorded; recorded steps: \[0, 1\]"):
        cache.step_cache(3)
    with pytest.raises(KeyError, match=r"canvas 4 was not recorded; recorded canvases: \[0\]"):
        cache.step_cache(0, canvas=4)


def test_logit_lens_of_a_bf16_cache(toy_pass, generation):
    model, ids, _ = toy_pass
    result, cache16 = model.generate_with_cache(
        ids, names_filter=RESIDS, steps=[1], dtype=torch.bfloat16, max_new_tokens=48, **GEN
    )
    view = cache16.step_cache(1)
    assert view["resid_post", 0].dtype == torch.bfloat16
    lens = view.logit_lens()
    assert lens.dtype == model.dtype
    lens32 = generation[1].step_cache(1).logit_lens()
    # bf16 keeps ~3 significant digits of the residual; the lens must agree to that precision.
    assert (lens.argmax(-1)[-1] == lens32.argmax(-1)[-1]).float().mean() > 0.9
    assert torch.equal(cache16.logit_lens(step=1), lens)


# ---------------------------------------------------------------------- pickling
def roundtrip_torch(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("roundtrip", [lambda c: pickle.loads(pickle.dumps(c)), roundtrip_torch])
def test_activation_cache_pickles(one_pass, roundtrip):
    _, cache = one_pass
    again = roundtrip(cache)
    assert isinstance(again, ActivationCache) and list(again) == list(cache)
    assert torch.equal(again["resid_post", 2], cache["resid_post", 2])
    torch.testing.assert_close(again.logit_lens(), cache.logit_lens())


@pytest.mark.parametrize("roundtrip", [lambda c: pickle.loads(pickle.dumps(c)), roundtrip_torch])
def test_memory_denoising_cache_pickles(generation, roundtrip):
    _, cache = generation
    again = roundtrip(cache)
    assert isinstance(again, DenoisingCache) and again.keys() == cache.keys()
    assert torch.equal(again["resid_post", 1], cache["resid_post", 1])
    assert torch.equal(again.logit_lens(step=1), cache.logit_lens(step=1))


def test_disk_denoising_cache_pickles_as_a_reference_to_its_directory(toy_pass, tmp_path):
    model, ids, _ = toy_pass
    _, cache = model.generate_with_cache(
        ids, names_filter=RESIDS, steps=[0, 1], storage="disk", path=tmp_path, max_new_tokens=48, **GEN
    )
    payload = pickle.dumps(cache)
    again = pickle.loads(payload)
    assert again.storage == "disk" and again.path == cache.path and again.backend.read_only
    assert torch.equal(again["resid_post", 2], cache["resid_post", 2])
    # The pickle names the directory; the tensors stay in the shards.
    assert len(payload) < cache["resid_post", 2].numel() * 4 + len(pickle.dumps(model))
    torch.testing.assert_close(again.step_cache(1).logit_lens(), cache.step_cache(1).logit_lens())
    with pytest.raises(ValueError, match="step_cache"):
        cache.to("cpu")


def test_stack_activation_refuses_layers_of_different_shapes(one_pass):
    """The toy's full-attention layers have twice the sliding layers' head size: their queries do not stack."""
    _, cache = one_pass
    stacked = cache.stack_activation("resid_post")
    assert torch.equal(stacked[3], cache["resid_post", 3]) and stacked.shape[0] == 6
    assert torch.equal(cache.stack_activation("q", 2)[1], cache["q", 1])
    with pytest.raises(ValueError, match="different shapes.*cache\\[name, layer\\]"):
        cache.stack_activation("q")
