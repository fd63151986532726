"""Partial passes (stop_at_layer / start_at_layer) and the denoising loss (return_type).

Every check of a split pass is `torch.equal` against one full pass, on random configs with every
tensor randomised (tests/reference.py), with left-padded prompts, with and without self-conditioning,
and for the encoder also when appending to an earlier PromptState (a later canvas).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from reference import CANVAS, CONFIGS, build_pair
from torch.nn import functional as F

from diffusionlens.losses import denoising_loss


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request):
    name = request.param
    _, model = build_pair(name)
    vocab, canvas_len = CONFIGS[name]["vocab_size"], CANVAS[name]
    g = torch.Generator().manual_seed(5)
    # Longer than twice the sliding window so that sliding layers drop keys; row 1 left-padded.
    prompt_len = 2 * CONFIGS[name]["sliding_window"] + 3
    ids = torch.randint(3, vocab, (2, prompt_len), generator=g)
    mask = torch.ones(2, prompt_len, dtype=torch.bool)
    mask[1, :4] = False
    later = torch.randint(3, vocab, (2, 5), generator=g)
    return SimpleNamespace(
        model=model,
        n=model.cfg.num_hidden_layers,
        ids=ids,
        mask=mask,
        later=later,
        canvas=torch.randint(0, vocab, (2, canvas_len), generator=g),
        self_cond=3.0 * torch.randn(2, canvas_len, vocab, generator=g),
    )


def assert_states_equal(a, b):
    assert a.encoded_layers is None and b.encoded_layers is None
    assert a.length == b.length and torch.equal(a.attention_mask, b.attention_mask)
    assert len(a.keys) == len(b.keys)
    for ka, kb, va, vb in zip(a.keys, b.keys, a.values, b.values, strict=True):
        assert torch.equal(ka, kb) and torch.equal(va, vb)
    assert torch.equal(a.last_hidden, b.last_hidden)


@pytest.mark.parametrize("self_cond", [False, True])
def test_decoder_split_at_every_layer_is_bit_identical(case, self_cond):
    model, sc = case.model, case.self_cond if self_cond else None
    with torch.no_grad():
        state = model.encode(case.ids, case.mask)
        full = model.denoise(case.canvas, state, sc)
        _, cache = model.run_with_cache(case.ids, case.canvas, sc, case.mask, names_filter=lambda n: "resid_pre" in n)
        for layer in range(case.n + 1):
            resid = model.denoise(case.canvas, state, sc, stop_at_layer=layer)
            assert resid.shape == (2, model.cfg.canvas_length, model.cfg.hidden_size)
            if layer < case.n:
                assert torch.equal(resid, cache[f"decoder.blocks.{layer}.hook_resid_pre"])
            assert torch.equal(model.denoise(resid, state, start_at_layer=layer), full), layer
            # The same through forward, reusing the encoded prompt.
            assert torch.equal(model(None, resid, prompt_state=state, start_at_layer=layer), full)


def test_decoder_middle_segment_and_negative_index(case):
    model = case.model
    with torch.no_grad():
        state = model.encode(case.ids, case.mask)
        full = model.denoise(case.canvas, state, case.self_cond)
        first = model.denoise(case.canvas, state, case.self_cond, stop_at_layer=1)
        middle = model.denoise(first, state, start_at_layer=1, stop_at_layer=-1)
        assert torch.equal(middle, model.denoise(case.canvas, state, case.self_cond, stop_at_layer=case.n - 1))
        assert torch.equal(model.denoise(middle, state, start_at_layer=case.n - 1), full)


@pytest.mark.parametrize("append", [False, True])
def test_encoder_split_at_every_layer_is_bit_identical(case, append):
    model = case.model
    with torch.no_grad():
        past = model.encode(case.ids, case.mask) if append else None
        ids = case.later if append else case.ids
        mask = None if append else case.mask
        full = model.encode(ids, mask, past)
        for layer in range(case.n + 1):
            resid, partial = model.encode(ids, mask, past, stop_at_layer=layer)
            assert resid.shape == (2, ids.shape[1], model.cfg.hidden_size)
            if layer < case.n:
                assert partial.encoded_layers == layer
                finished = model.encode(resid, prompt_state=partial, start_at_layer=layer)
            else:
                finished = partial  # every block ran: the state is already finished
            assert_states_equal(finished, full)
            # The rebuilt state drives the decoder to the same logits.
            assert torch.equal(model.denoise(case.canvas, finished), model.denoise(case.canvas, full))


def test_stop_matches_resid_pre_hook_and_a_continuation_reruns_only_later_blocks(case):
    model = case.model
    store: dict[str, torch.Tensor] = {}
    fired: list[str] = []
    record = [(lambda n: n.endswith("hook_resid_pre"), lambda x, hook: fired.append(hook.name))]
    with torch.no_grad():
        with model.hooks(model.caching_hooks(store, lambda n: n.startswith("encoder.") and "resid_pre" in n)):
            model.encode(case.ids, case.mask)
        resid, partial = model.encode(case.ids, case.mask, stop_at_layer=2)
        assert torch.equal(resid, store["encoder.blocks.2.hook_resid_pre"])
        with model.hooks(record):
            state = model.encode(resid, prompt_state=partial, start_at_layer=2)
        assert fired == [f"encoder.blocks.{layer}.hook_resid_pre" for layer in range(2, case.n)]
        fired.clear()
        decoder_resid = model.denoise(case.canvas, state, stop_at_layer=2)
        with model.hooks(record):
            model.denoise(decoder_resid, state, start_at_layer=2)
        assert fired == [f"decoder.blocks.{layer}.hook_resid_pre" for layer in range(2, case.n)]


def test_loss_return_types(case):
    model = case.model
    targets = case.canvas.clone()
    targets[:, -2:] = model.cfg.pad_token_id
    with torch.no_grad():
        logits = model(case.ids, case.canvas, case.self_cond, case.mask)
        loss = model(case.ids, case.canvas, case.self_cond, case.mask, return_type="loss", targets=targets)
        both = model(case.ids, case.canvas, case.self_cond, case.mask, return_type="both", targets=targets)
        assert model(case.ids, case.canvas, return_type=None) is None
    # Pads don't count: the mean over the non-pad positions.
    expected = F.cross_entropy(logits[:, :-2].flatten(0, 1), targets[:, :-2].flatten())
    assert torch.allclose(loss, expected, rtol=1e-6)
    assert torch.equal(both[0], logits) and torch.equal(both[1], loss)
    only_first = torch.zeros_like(targets, dtype=torch.bool)
    only_first[:, 0] = True
    masked = model(case.ids, case.canvas, case.self_cond, case.mask, return_type="loss", targets=targets,
                   loss_mask=only_first)  # fmt: skip
    assert torch.allclose(masked, F.cross_entropy(logits[:, 0], targets[:, 0]), rtol=1e-6)


def test_weighted_loss_is_the_weighted_mean():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g)
    targets = torch.randint(0, 7, (3, 5), generator=g)
    weights = torch.rand(3, 5, generator=g)
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(3, 5)
    assert torch.allclose(denoising_loss(logits, targets, weights=weights), (ce * weights).sum() / weights.sum())
    # pad_token_id drops those targets; weights still scale the rest.
    keep = targets != 0
    got = denoising_loss(logits, targets, weights=weights, pad_token_id=0)
    assert torch.allclose(got, (ce * weights * keep).sum() / (weights * keep).sum())
    with pytest.raises(ValueError, match="no canvas position counts"):
        denoising_loss(logits, targets, loss_mask=torch.zeros(3, 5, dtype=torch.bool))


def test_bad_arguments_name_the_fix(case):
    model, n, d = case.model, case.n, case.model.cfg.hidden_size
    state = model.encode(case.ids, case.mask)
    canvas_len = model.cfg.canvas_length
    with pytest.raises(ValueError, match=rf"0\.\.{n}"):
        model.denoise(case.canvas, state, stop_at_layer=n + 1)
    with pytest.raises(ValueError, match=rf"0\.\.{n}"):
        model.encode(case.ids, case.mask, stop_at_layer=-n - 1)
    with pytest.raises(ValueError, match=rf"expected \(2, {canvas_len}, {d}\)"):
        model.denoise(torch.zeros(2, canvas_len, d + 1), state, start_at_layer=1)
    with pytest.raises(TypeError, match="residual stream"):
        model.denoise(case.canvas, state, start_at_layer=1)
    with pytest.raises(ValueError, match="self_cond_logits=None"):
        model.denoise(torch.zeros(2, canvas_len, d), state, case.self_cond, start_at_layer=1)
    with pytest.raises(ValueError, match="targets="):
        model(case.ids, case.canvas, return_type="loss")
    with pytest.raises(ValueError, match="return_type"):
        model(case.ids, case.canvas, return_type="logit")
    with pytest.raises(ValueError, match="comes before"):
        model.denoise(torch.zeros(2, canvas_len, d), state, start_at_layer=2, stop_at_layer=1)
    resid, partial = model.encode(case.ids, case.mask, stop_at_layer=1)
    with pytest.raises(ValueError, match="start_at_layer=1"):
        model.encode(resid, prompt_state=partial, start_at_layer=2)
    with pytest.raises(ValueError, match=rf"expected \(2, {case.ids.shape[1]}, {d}\)"):
        model.encode(resid[:, 1:], prompt_state=partial, start_at_layer=1)
    with pytest.raises(ValueError, match="partial"):
        model.denoise(case.canvas, partial)
    with pytest.raises(ValueError, match="prompt_state="):
        model.encode(resid, start_at_layer=1)
