"""One layer resolver, one selector parser, one stack check (`diffusionlens.cache.selectors`), as every
helper reads them.

A negative layer means the same in every helper taking one (TransformerLens's meaning, in the sense the
argument has); every selector is checked for type, sign and range, and a recording's selectors are
refused before the run starts.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_decomposition import CFG, random_model, run_all

from diffusionlens import HookedDiffusionGemma, HookedGemma4CausalLM, ReplayNoise
from diffusionlens.cache.selectors import check_stack, index_axis, resolve_layer, resolve_selector, select_indices
from diffusionlens.patching import Patch
from diffusionlens.viz.attention import attention_pattern
from diffusionlens.weights.tl_weights import block_weights

N = CFG.num_hidden_layers


@pytest.fixture(scope="module")
def setup():
    model = random_model(torch.float32)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, CFG.vocab_size, (2, 7), generator=g)
    canvas = torch.randint(0, CFG.vocab_size, (2, CFG.canvas_length), generator=g)
    self_cond = torch.randn(2, CFG.canvas_length, CFG.vocab_size, generator=g)
    _, cache = run_all(model, ids, canvas, self_cond)
    _, denoising = model.generate_with_cache(
        ids[:1],
        names_filter=["decoder.blocks.*.hook_resid_post", "decoder.blocks.*.attn.hook_pattern"],
        max_new_tokens=CFG.canvas_length,
        max_denoising_steps=2,
        noise=ReplayNoise(0),
        eos_token_id=None,
        progress=False,
    )
    return SimpleNamespace(model=model, ids=ids, canvas=canvas, self_cond=self_cond, cache=cache, denoising=denoising)


# ---------------------------------------------------------------------- layers
# Each helper taking a layer, by the sense its layer has: (call, how many a negative counts back over).
RESIDUAL_HELPERS = {
    "accumulated_resid": lambda s, layer: s.cache.accumulated_resid(layer),
    "decompose_resid": lambda s, layer: s.cache.decompose_resid(layer),
    "logit_lens": lambda s, layer: s.cache.logit_lens(layer),
    "stack_head_results": lambda s, layer: s.cache.stack_head_results(layer, incl_remainder=True),
    "stack_neuron_results": lambda s, layer: s.cache.stack_neuron_results(layer, incl_remainder=True),
    "stack_expert_results": lambda s, layer: s.cache.stack_expert_results(layer, incl_remainder=True),
    "get_full_resid_decomposition": lambda s, layer: s.cache.get_full_resid_decomposition(layer),
    "encoder accumulated_resid": lambda s, layer: s.cache.accumulated_resid(layer, stack="encoder"),
    "encoder stack_head_results": lambda s, layer: s.cache.stack_head_results(layer, stack="encoder"),
}
BLOCK_HELPERS = {
    "ActivationCache[name, layer]": lambda s, layer: s.cache["resid_post", layer],
    "ActivationCache[name, layer, 'encoder']": lambda s, layer: s.cache["resid_post", layer, "encoder"],
    "DenoisingCache[name, layer]": lambda s, layer: s.denoising["resid_post", layer],
    "block_weights": lambda s, layer: block_weights(s.model, layer).W_Q,
    "attention_pattern": lambda s, layer: attention_pattern(s.denoising, 0, layer),
}


def _denoise(s, stop):
    with torch.no_grad():
        state = s.model.encode(s.ids)
        return s.model.denoise(s.canvas, state, s.self_cond, stop_at_layer=stop)


def _encode_stop(s, layer):
    with torch.no_grad():
        return s.model.encode(s.ids, stop_at_layer=layer)[0]


def _finish_from(s, layer):
    """The decoder run from `start_at_layer=layer` on the residual before block `layer` (resolved here)."""
    with torch.no_grad():
        state = s.model.encode(s.ids)
        resid = s.model.denoise(s.canvas, state, s.self_cond, stop_at_layer=layer % N if layer < 0 else layer)
        return s.model.denoise(resid, state, start_at_layer=layer)


BOUND_HELPERS = {
    "denoise(stop_at_layer)": lambda s, layer: _denoise(s, stop=layer),
    "encode(stop_at_layer)": _encode_stop,
    "denoise(start_at_layer)": _finish_from,
}
HELPERS = {
    **{name: (call, N + 1) for name, call in RESIDUAL_HELPERS.items()},
    **{name: (call, N) for name, call in BLOCK_HELPERS.items()},
    **{name: (call, N) for name, call in BOUND_HELPERS.items()},
}


@pytest.mark.parametrize("helper", HELPERS)
def test_a_negative_layer_counts_back_as_python_indexing_in_every_helper(setup, helper):
    """-k is what TransformerLens's -k is: Python indexing over what the layer ranges over (the n + 1
    points of the residual stream, the n blocks, or the n + 1 bounds of blocks[start:stop])."""
    call, count = HELPERS[helper]
    for back in range(1, count + 1):
        assert torch.equal(call(setup, -back), call(setup, count - back)), f"{helper}: layer {-back}"
    with pytest.raises((ValueError, KeyError), match=rf"={-(count + 1)} is out of range.*-{count}\.\.-1"):
        call(setup, -(count + 1))
    top = N + 1 if helper in BOUND_HELPERS or helper in RESIDUAL_HELPERS else N
    with pytest.raises((ValueError, KeyError), match=rf"={top} is out of range"):
        call(setup, top)


@pytest.mark.parametrize("helper", RESIDUAL_HELPERS)
def test_minus_one_and_none_are_after_the_last_block(setup, helper):
    call = RESIDUAL_HELPERS[helper]
    assert torch.equal(call(setup, -1), call(setup, None)) and torch.equal(call(setup, -1), call(setup, N))


@pytest.mark.parametrize("back", range(1, N + 2))
def test_every_residual_helper_reads_the_same_residual_at_a_negative_layer(setup, back):
    """Not just self-consistent: the decompositions at layer -k sum to accumulated_resid's last entry at -k."""
    resid = setup.cache.accumulated_resid(-back)[-1]
    for parts in (
        setup.cache.decompose_resid(-back),
        setup.cache.get_full_resid_decomposition(-back),
        setup.cache.stack_head_results(-back, incl_remainder=True),
    ):
        torch.testing.assert_close(parts.sum(0), resid, atol=1e-4, rtol=1e-4)


def test_apply_ln_to_stack_takes_every_name_for_the_final_residual(setup):
    parts = setup.cache.get_full_resid_decomposition()
    expected = setup.cache.apply_ln_to_stack(parts, None)
    for layer in (-1, N):
        assert torch.equal(setup.cache.apply_ln_to_stack(parts, layer), expected)
    with pytest.raises(ValueError, match="final norm only"):
        setup.cache.apply_ln_to_stack(parts, -2)


@pytest.mark.parametrize(
    ("layer", "error", "match"),
    [
        (1.0, TypeError, "layer must be an int or None, got 1.0"),
        (True, TypeError, "layer must be an int or None, got True"),
        ("encoder", TypeError, "pass stack='encoder' by keyword"),
    ],
)
def test_a_layer_that_is_not_an_int_is_refused(layer, error, match):
    with pytest.raises(error, match=match):
        resolve_layer(layer, 4)


def test_a_negative_layer_without_a_layer_count_is_refused():
    with pytest.raises(ValueError, match=r"layer=-1: negative layers count back .* pass n_layers \+ \(-1\)"):
        resolve_layer(-1, None)
    assert resolve_layer(7, None) == 7  # nothing to check it against: the caller's range check applies


def test_one_stack_check_names_the_stacks_the_model_has(setup):
    assert check_stack("encoder", setup.model) == "encoder"
    with pytest.raises(ValueError, match="stack must be one of 'encoder', 'decoder', got 'causal'"):
        setup.cache.accumulated_resid(stack="causal")
    with pytest.raises(ValueError, match="stack must be one of 'encoder', 'decoder', got 'decodr'"):
        block_weights(setup.model, 0, stack="decodr")
    with pytest.raises(ValueError, match="stack must be one of 'encoder', 'decoder', 'causal', got 'both'"):
        check_stack("both")


def test_the_causal_twin_decomposes_through_the_same_checks():
    """check_stack accepts the stacks the model has, so the causal twin's one stack decomposes exactly too."""
    twin = HookedGemma4CausalLM.from_config(CFG, seed=3)
    for module in twin.modules():  # what set_use_attn_result / set_use_expert_outputs switch on the diffusion model
        for switch in ("use_attn_result", "use_expert_outputs"):
            if hasattr(module, switch):
                setattr(module, switch, True)
    with torch.no_grad():
        _, cache = twin.run_with_cache(
            torch.randint(3, CFG.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
        )
    for layer in (None, -2, 1):
        parts = cache.get_full_resid_decomposition(layer, stack="causal")
        torch.testing.assert_close(
            parts.sum(0), cache.accumulated_resid(layer, stack="causal")[-1], atol=1e-5, rtol=1e-5
        )
    with pytest.raises(ValueError, match="stack must be one of 'causal', got 'decoder'"):
        cache.stack_head_results()


# ---------------------------------------------------------------------- selectors in generate_with_cache
@pytest.fixture(scope="module")
def toy():
    return HookedDiffusionGemma.from_pretrained("toy", progress=False)


BAD_SELECTORS = [
    # (keyword, value, error, message): the message names the bad value, the valid range and the fix
    ("positions", -100, ValueError, r"positions=-100 is out of range for 48 canvas positions .* 0\.\.47, or -48\.\.-1"),
    ("positions", 999, ValueError, r"positions=999 is out of range for 48 canvas positions .* 0\.\.47"),
    ("positions", [0.7, 1.9], TypeError, r"positions=\[0\.7, 1\.9\]: 0\.7 is not an int index; pass whole indices"),
    ("positions", slice(100, 200), ValueError, r"positions=slice\(100, 200, None\) is out of range for 48"),
    ("positions", slice(5, 5), ValueError, r"positions=slice\(5, 5, None\) selects nothing of 48 .* or pass 'all'"),
    ("positions", [], ValueError, r"positions=\[\] selects nothing"),
    ("positions", [3, 48], ValueError, r"positions=\[3, 48\] is out of range for 48"),
    ("positions", [True, False], TypeError, r"True is not an int index; pass a bool mask as a tensor"),
    ("positions", torch.ones(3, dtype=torch.bool), ValueError, r"bool mask needs one entry per index \(48 canvas"),
    ("positions", torch.tensor([1.0, 2.0]), TypeError, r"positions must be an int, .*float32 tensor"),
    ("positions", "last", TypeError, r"positions must be an int, .*'all'; got 'last'"),
    ("positions", True, TypeError, r"positions must be an int, .*got True"),
    ("positions", (1, 2, 3, 4), TypeError, r"a tuple is a \(start, stop\[, step\]\) slice"),
    ("steps", 3, ValueError, r"steps=3 is out of range for 3 denoising steps \(max_denoising_steps\): use 0\.\.2"),
    ("steps", -4, ValueError, r"steps=-4 is out of range for 3 denoising steps"),
    ("steps", slice(0, 2, 0), ValueError, r"slice step cannot be zero"),
    ("canvases", 1, ValueError, r"canvases=1 is out of range for 1 canvases \(max_new_tokens / canvas_length\)"),
    ("canvases", {0: 1}, TypeError, r"canvases must be an int, .*got dict"),
]


@pytest.mark.parametrize(("keyword", "value", "error", "match"), BAD_SELECTORS, ids=lambda v: repr(v)[:30])
def test_a_bad_selector_is_refused_before_generating(toy, tmp_path, keyword, value, error, match):
    fired = []
    toy.add_hook("decoder.hook_embed", lambda x, hook: fired.append(1))
    try:
        with pytest.raises(error, match=match):
            toy.generate_with_cache(
                toy.to_tokens("squares 4 8:"),
                names_filter="decoder.hook_logits",
                storage="disk",
                path=tmp_path / "cache",
                max_new_tokens=toy.cfg.canvas_length,
                max_denoising_steps=3,
                noise=ReplayNoise(0),
                progress=False,
                **{keyword: value},
            )
    finally:
        toy.reset_hooks()
    assert not fired, "the selector was refused only after the run had started"
    assert not (tmp_path / "cache").exists(), "a cache directory was made for a refused request"


def test_valid_selectors_record_what_python_indexing_picks(toy):
    ids = toy.to_tokens("squares 4 8:")
    kw = dict(names_filter="decoder.hook_logits", max_new_tokens=48, max_denoising_steps=3, progress=False)
    _, full = toy.generate_with_cache(ids, noise=ReplayNoise(0), **kw)
    picks = [(-1, [47]), (slice(-3, None), [45, 46, 47]), ([5, -48], [0, 5]), ((2, 8, 3), [2, 5])]
    for positions, expected in picks:
        _, cache = toy.generate_with_cache(ids, noise=ReplayNoise(0), positions=positions, **kw)
        assert cache.positions == expected
        assert torch.equal(cache["decoder.hook_logits"], full["decoder.hook_logits"][:, :, expected])
    # -2 counts back from max_denoising_steps (3), not from the steps this run happened to take.
    assert len(full.steps()) >= 2
    _, second = toy.generate_with_cache(ids, noise=ReplayNoise(0), steps=-2, **kw)
    assert second.steps() == [1]


def test_patch_positions_are_checked_before_the_run(toy):
    with pytest.raises(ValueError, match=r"positions=48 is out of range for 48 canvas positions"):
        Patch("decoder.blocks.0.hook_resid_post", torch.zeros(()), positions=48).hooks(toy)
    with pytest.raises(ValueError, match=r"canvases=-1: negative indices count back from a size not known here"):
        Patch("decoder.blocks.0.hook_resid_post", torch.zeros(()), canvases=-1).hooks(toy)


def test_pos_slice_out_of_range_names_the_axis(setup):
    with pytest.raises(ValueError, match=r"pos_slice=5 is out of range for 5 positions: use 0\.\.4"):
        setup.cache.accumulated_resid(pos_slice=5)
    with pytest.raises(ValueError, match=r"neuron_slice=\[0, 99\] is out of range for \d+ neurons"):
        setup.cache.stack_neuron_results(neuron_slice=[0, 99])


# ---------------------------------------------------------------------- the parser, property-tested
sizes = st.integers(1, 40)
bounds = st.one_of(st.none(), st.integers(-60, 60))


@given(sizes, st.data())
def test_an_int_in_range_picks_what_python_indexing_picks(size, data):
    i = data.draw(st.integers(-size, size - 1))
    assert resolve_selector(i, size, "x") == range(size)[i]
    assert select_indices(i, size, "x") == {range(size)[i]}
    assert torch.equal(index_axis(torch.arange(size), i, 0, "x"), torch.tensor(range(size)[i]))


@given(sizes, st.integers(-200, 200))
def test_an_int_out_of_range_is_refused(size, i):
    if -size <= i < size:
        return
    with pytest.raises(ValueError, match=rf"x={i} is out of range for {size} indices: use 0\.\.{size - 1}"):
        resolve_selector(i, size, "x")


@given(sizes, bounds, bounds, st.one_of(st.none(), st.integers(-5, 5).filter(bool)))
def test_a_slice_agrees_with_python_or_is_refused(size, start, stop, step):
    chosen = slice(start, stop, step)
    picked = list(range(size)[chosen])
    start_off_axis = start is not None and not -size <= start < size
    if start_off_axis or not picked:
        with pytest.raises(ValueError, match="out of range" if start_off_axis else "selects nothing"):
            resolve_selector(chosen, size, "x")
        return
    assert select_indices(chosen, size, "x") == set(picked)
    assert index_axis(torch.arange(size), chosen, 0, "x").tolist() == picked
    as_tuple = (start, stop) if step is None else (start, stop, step)
    assert index_axis(torch.arange(size), as_tuple, 0, "x").tolist() == picked


@given(sizes, st.data())
def test_a_list_agrees_with_python_indexing_in_its_order(size, data):
    indices = data.draw(st.lists(st.integers(-size, size - 1), min_size=1, max_size=10))
    expected = [range(size)[i] for i in indices]
    assert resolve_selector(indices, size, "x") == expected
    assert index_axis(torch.arange(size), indices, 0, "x").tolist() == expected
    assert index_axis(torch.arange(size), torch.tensor(indices), 0, "x").tolist() == expected
    assert select_indices(indices, size, "x") == set(expected)


@given(sizes, st.data())
def test_a_list_with_one_index_off_the_axis_is_refused(size, data):
    good = data.draw(st.lists(st.integers(-size, size - 1), max_size=5))
    bad = data.draw(st.one_of(st.integers(size, size + 100), st.integers(-size - 100, -size - 1)))
    at = data.draw(st.integers(0, len(good)))
    with pytest.raises(ValueError, match=f"out of range for {size} indices"):
        resolve_selector([*good[:at], bad, *good[at:]], size, "x")


@given(st.lists(st.booleans(), min_size=1, max_size=40))
def test_a_bool_mask_picks_its_true_entries(mask):
    size = len(mask)
    if not any(mask):
        with pytest.raises(ValueError, match="selects nothing"):
            resolve_selector(torch.tensor(mask), size, "x")
        return
    picked = [i for i, keep in enumerate(mask) if keep]
    assert select_indices(torch.tensor(mask), size, "x") == set(picked)
    assert index_axis(torch.arange(size), torch.tensor(mask), 0, "x").tolist() == picked
    with pytest.raises(ValueError, match="one entry per index"):
        resolve_selector(torch.tensor([*mask, True]), size, "x")


@given(sizes, st.lists(st.floats(allow_nan=False), min_size=1, max_size=4))
def test_floats_are_refused_whatever_they_round_to(size, values):
    with pytest.raises(TypeError, match="is not an int index"):
        resolve_selector(values, size, "x")
    with pytest.raises(TypeError, match="x must be"):
        resolve_selector(values[0], size, "x")


@given(sizes)
def test_all_and_none_pick_everything(size):
    for everything in ("all", None):
        assert resolve_selector(everything, size, "x") is None
        assert select_indices(everything, size, "x") is None
