"""Bad input gets a clear error and leaves the model usable; property tests over random configs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import CANVAS, TINY_VISION, build_pair
from transformers import DiffusionGemmaConfig as HFConfig
from transformers import DiffusionGemmaForBlockDiffusion

from diffusionlens import DenoisingCache, HookedDiffusionGemma, ReplayNoise
from diffusionlens.patching import Patch, record_run, run_patched


@pytest.fixture(scope="module")
def model():
    return build_pair("mixed", seed=1)[1]


def _still_works(model):
    ids = torch.tensor([[3, 4, 5]])
    canvas = torch.zeros(1, CANVAS["mixed"], dtype=torch.long)
    assert torch.isfinite(model(ids, canvas)).all()
    assert not model.has_hooks


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: m(torch.tensor([[3, 200]]), torch.zeros(1, 8, dtype=torch.long)), "outside the vocabulary"),
        (lambda m: m(torch.tensor([[3, 4]]), torch.zeros(1, 5, dtype=torch.long)), "canvas_length"),
        (lambda m: m(torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long)), "empty"),
        (lambda m: m(torch.full((1, 600), 3), torch.zeros(1, 8, dtype=torch.long)), "max_position_embeddings"),
        pytest.param(
            lambda m: m(torch.tensor([[3.0, 4.0]]), torch.zeros(1, 8, dtype=torch.long)),
            "integer tensor",
            marks=pytest.mark.without_shape_checks,  # the annotation's dtype check would answer first
        ),
        (lambda m: m(torch.tensor([[3, 4]]), torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, 5)), "self_cond"),
        (lambda m: m.generate(torch.tensor([[3]]), t_min=0.9, t_max=0.1, progress=False), "t_min"),
        (lambda m: m.generate(torch.tensor([[3]]), entropy_bound=-0.1, progress=False), "entropy_bound"),
        (lambda m: m.generate(torch.tensor([[3]]), max_denoising_steps=0, progress=False), "max_denoising_steps"),
        (
            lambda m: m.run_with_hooks(
                torch.tensor([[3]]),
                torch.zeros(1, 8, dtype=torch.long),
                fwd_hooks=[("decoder.blocks.9.hook_resid_post", lambda x, h: None)],
            ),
            "Nearest",
        ),
    ],
)
def test_bad_input_is_refused_clearly_and_the_model_stays_usable(model, call, match):
    with pytest.raises((ValueError, TypeError, KeyError), match=match):
        call(model)
    _still_works(model)


def test_keyboard_interrupt_mid_generation_and_mid_sweep_leaves_no_hooks(model):
    ids = torch.tensor([[3, 4, 5, 6]])
    kw = dict(max_new_tokens=8, max_denoising_steps=5, noise=ReplayNoise(0), progress=False)
    fresh = model.generate(ids, **kw).sequences

    def interrupt(x, hook):
        if hook.ctx.step == 2:
            raise KeyboardInterrupt
        return x

    with pytest.raises(KeyboardInterrupt):
        model.generate(ids, fwd_hooks=[("decoder.blocks.1.hook_resid_post", interrupt)], **kw)
    assert not model.has_hooks and model.hook_ctx.step is None
    assert torch.equal(model.generate(ids, **kw).sequences, fresh)
    base = record_run(model, ids, names_filter="decoder.blocks.0.hook_resid_post", **kw)
    with pytest.raises(KeyboardInterrupt):
        run_patched(model, base, Patch("decoder.blocks.0.hook_resid_post", interrupt), mode="frozen")
    assert not model.has_hooks
    assert torch.equal(model.generate(ids, **kw).sequences, fresh)


@st.composite
def tiny_configs(draw):
    n_layers = draw(st.integers(2, 4))
    kinds = draw(
        st.lists(st.sampled_from(["sliding_attention", "full_attention"]), min_size=n_layers - 1, max_size=n_layers - 1)
    )
    heads = draw(st.sampled_from([2, 4]))
    n_experts = draw(st.integers(2, 4))
    return (
        dict(
            vocab_size=draw(st.integers(20, 60)),
            hidden_size=draw(st.sampled_from([16, 24])),
            intermediate_size=draw(st.sampled_from([16, 32])),
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=draw(st.sampled_from([1, heads])),
            head_dim=draw(st.sampled_from([4, 8])),
            global_head_dim=draw(st.sampled_from([8, 16])),
            num_global_key_value_heads=draw(st.sampled_from([1, 2])),
            sliding_window=draw(st.integers(2, 6)),
            layer_types=[*kinds, "full_attention"],
            num_experts=n_experts,
            top_k_experts=draw(st.integers(1, n_experts)),
            moe_intermediate_size=draw(st.sampled_from([4, 8])),
            max_position_embeddings=128,
        ),
        draw(st.integers(1, 9)),
        draw(st.integers(2, 6)),
        draw(st.integers(0, 2**16)),
    )


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tiny_configs())
def test_random_tiny_configs_match_transformers(spec):
    text, prompt_len, canvas_len, seed = spec
    torch.manual_seed(seed)
    reference = DiffusionGemmaForBlockDiffusion(
        HFConfig(text_config=text, vision_config=dict(TINY_VISION), canvas_length=canvas_len)
    ).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in reference.state_dict(keep_vars=True).items():
            if tensor.is_floating_point() and not name.endswith(("embed_scale", "inv_freq")):
                tensor.copy_(
                    1.0 + 0.3 * torch.randn(tensor.shape, generator=gen)
                    if "norm" in name or "scal" in name
                    else 0.2 * torch.randn(tensor.shape, generator=gen)
                )
    ours = HookedDiffusionGemma.from_pretrained(reference)
    ids = torch.randint(0, text["vocab_size"], (2, prompt_len), generator=gen)
    canvas = torch.randint(0, text["vocab_size"], (2, canvas_len), generator=gen)
    self_cond = torch.randn(2, canvas_len, text["vocab_size"], generator=gen)
    with torch.no_grad():
        expected = reference(input_ids=ids, decoder_input_ids=canvas, self_conditioning_logits=self_cond).logits
    assert torch.allclose(ours(ids, canvas, self_cond), expected, atol=1e-4 * expected.abs().max())


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    steps=st.lists(st.integers(0, 4), max_size=3, unique=True),
    positions=st.lists(st.integers(0, 7), min_size=1, max_size=4, unique=True),
    names=st.lists(
        st.sampled_from(
            [
                "decoder.blocks.0.hook_resid_post",
                "decoder.blocks.2.attn.hook_z",
                "decoder.blocks.3.mlp.hook_post",
                "sampler.hook_canvas_next",
            ]
        ),
        min_size=1,
        max_size=3,
        unique=True,
    ),
)
def test_random_identity_patches_reproduce_the_run_and_caches_round_trip(
    model, tmp_path_factory, steps, positions, names
):
    ids = torch.tensor([[3, 9, 4, 7, 5]])
    kw = dict(max_new_tokens=8, max_denoising_steps=5)
    path = tmp_path_factory.mktemp("cache")
    base = record_run(model, ids, names_filter=names, **kw)
    patches = [Patch(name, base.cache, steps=steps or "all", positions=positions) for name in names]
    patched = run_patched(model, base, patches)
    assert torch.equal(patched.sequences, base.sequences)
    _, disk = model.generate_with_cache(
        ids, names_filter=names, storage="disk", path=path, noise=ReplayNoise(0), progress=False, **kw
    )
    reopened = DenoisingCache.load(path)
    for name in names:
        assert torch.equal(reopened[name], base.cache[name])
