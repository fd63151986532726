"""Forward-pass equivalence with transformers' DiffusionGemmaForBlockDiffusion, built in each test.

Everything is compared against the transformers model the test builds (tests/reference.py), never
against stored numbers. On CPU in fp32 our forward is bit-identical to transformers', so besides the
documented tolerance (1e-4 of the logits' max |value|) the tests also assert `torch.equal`, to catch
any regression in the order of operations.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from reference import CANVAS, CONFIGS, build_pair, build_reference
from torch.nn import functional as F

from diffusionlens import HookedDiffusionGemma

RTOL = 1e-4  # max |ours - reference| / max |reference|
# bf16: measured 0.0 (bit-identical) over 4 seeds x 2 configs x with/without self-conditioning on
# CPU; the documented bound leaves room for one bf16 rounding step (eps = 2**-7 = 7.8e-3).
BF16_RTOL = 1e-2


def rel_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.float(), ref.float()
    return float((ours - ref).abs().max() / ref.abs().max())


def make_inputs(name: str, batch: int, prompt_len: int, seed: int) -> SimpleNamespace:
    vocab, canvas_len = CONFIGS[name]["vocab_size"], CANVAS[name]
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(
        ids=torch.randint(3, vocab, (batch, prompt_len), generator=g),
        canvas=torch.randint(0, vocab, (batch, canvas_len), generator=g),
        # Peaked logits so that the soft embedding is far from the uniform average.
        self_cond=3.0 * torch.randn(batch, canvas_len, vocab, generator=g),
    )


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request):
    name = request.param
    reference, ours = build_pair(name)
    # Longer than twice the sliding window, so sliding layers drop prompt keys in both stacks.
    prompt_len = 2 * CONFIGS[name]["sliding_window"] + 3
    inputs = make_inputs(name, batch=2, prompt_len=prompt_len, seed=11)
    return SimpleNamespace(name=name, reference=reference, ours=ours, **vars(inputs))


def reference_outputs(case, self_cond, **kw):
    with torch.no_grad():
        return case.reference(
            input_ids=case.ids,
            decoder_input_ids=case.canvas,
            self_conditioning_logits=self_cond,
            output_hidden_states=True,
            **kw,
        )


@pytest.mark.parametrize("with_self_cond", [False, True], ids=["no_self_cond", "self_cond"])
def test_logits_match_transformers(case, with_self_cond):
    self_cond = case.self_cond if with_self_cond else None
    expected = reference_outputs(case, self_cond).logits
    with torch.no_grad():
        logits = case.ours(case.ids, case.canvas, self_cond)
    assert logits.dtype == torch.float32
    assert logits.shape == (2, CANVAS[case.name], CONFIGS[case.name]["vocab_size"])
    assert rel_diff(logits, expected) <= RTOL
    assert torch.equal(logits, expected), f"fp32 logits no longer bit-identical: {rel_diff(logits, expected):.3g}"


def test_self_conditioning_changes_logits(case):
    """Guards the power of the test above: the self-conditioning path must matter."""
    with torch.no_grad():
        plain = case.ours(case.ids, case.canvas)
        conditioned = case.ours(case.ids, case.canvas, case.self_cond)
    assert rel_diff(conditioned, plain) > 1e-3


@pytest.mark.parametrize("with_self_cond", [False, True], ids=["no_self_cond", "self_cond"])
def test_decoder_residual_stream_matches_hidden_states(case, with_self_cond):
    """transformers records each decoder layer's output; the last entry is replaced by the final norm's
    output. So hidden_states[l] is block l's input (resid_pre; [0] is the self-conditioned embedding)
    and hidden_states[-1] is ln_final's output."""
    self_cond = case.self_cond if with_self_cond else None
    hidden = reference_outputs(case, self_cond).hidden_states
    n_layers = CONFIGS[case.name]["num_hidden_layers"]
    assert len(hidden) == n_layers + 1
    with torch.no_grad():
        _, cache = case.ours.run_with_cache(case.ids, case.canvas, self_cond)
    for layer in range(n_layers):
        ours = cache[f"decoder.blocks.{layer}.hook_resid_pre"]
        assert ours.shape == hidden[layer].shape
        assert rel_diff(ours, hidden[layer]) <= RTOL, f"decoder block {layer} resid_pre"
        assert torch.equal(ours, hidden[layer]), f"decoder block {layer} resid_pre not bit-identical"
        if layer + 1 < n_layers:
            assert torch.equal(cache[f"decoder.blocks.{layer}.hook_resid_post"], hidden[layer + 1])
    assert torch.equal(cache["decoder.ln_final.hook_normalized"], hidden[-1])
    # Block 0's input is the self-conditioned embedding, not the raw token embedding.
    assert torch.equal(cache["decoder.self_cond.post_norm.hook_normalized"], hidden[0])
    assert not torch.allclose(cache["decoder.hook_embed"], hidden[0])


def test_encoder_last_hidden_state(case):
    expected = reference_outputs(case, None).encoder_last_hidden_state
    with torch.no_grad():
        state = case.ours.encode(case.ids)
    assert state.last_hidden.shape == expected.shape
    assert rel_diff(state.last_hidden, expected) <= RTOL
    assert torch.equal(state.last_hidden, expected)


# ---------------------------------------------------------------------- left padding
@pytest.fixture(scope="module", params=sorted(CONFIGS))
def padded(request):
    name = request.param
    reference, ours = build_pair(name, seed=2)
    window = CONFIGS[name]["sliding_window"]
    long_len, short_len = 2 * window + 1, window - 1  # one longer than the window, one shorter
    a = make_inputs(name, 1, long_len, seed=21)
    b = make_inputs(name, 1, short_len, seed=22)
    n_pad = long_len - short_len
    ids = torch.cat((a.ids, F.pad(b.ids, (n_pad, 0), value=0)))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :n_pad] = False
    return SimpleNamespace(
        name=name,
        reference=reference,
        ours=ours,
        rows=(a, b),
        ids=ids,
        mask=mask,
        canvas=torch.cat((a.canvas, b.canvas)),
        self_cond=torch.cat((a.self_cond, b.self_cond)),
    )


@pytest.mark.parametrize("with_self_cond", [False, True], ids=["no_self_cond", "self_cond"])
def test_left_padded_rows_equal_rows_alone(padded, with_self_cond):
    self_cond = padded.self_cond if with_self_cond else None
    with torch.no_grad():
        batched = padded.ours(padded.ids, padded.canvas, self_cond, attention_mask=padded.mask)
        for i, row in enumerate(padded.rows):
            alone = padded.ours(row.ids, row.canvas, row.self_cond if with_self_cond else None)
            assert rel_diff(batched[i : i + 1], alone) <= RTOL, f"row {i}"
        # Power check: without the mask the padded row reads its padding and changes.
        unmasked = padded.ours(padded.ids, padded.canvas, self_cond)
    assert rel_diff(unmasked[1:], batched[1:]) > 1e-3


@pytest.mark.parametrize("with_self_cond", [False, True], ids=["no_self_cond", "self_cond"])
def test_left_padded_matches_transformers_with_decoder_mask(padded, with_self_cond):
    """transformers' forward masks prompt padding in the decoder only when given decoder_attention_mask
    (its generate passes one); we always mask it."""
    self_cond = padded.self_cond if with_self_cond else None
    canvas_len = CANVAS[padded.name]
    with torch.no_grad():
        expected = padded.reference(
            input_ids=padded.ids,
            attention_mask=padded.mask,
            decoder_input_ids=padded.canvas,
            self_conditioning_logits=self_cond,
            decoder_attention_mask=F.pad(padded.mask, (0, canvas_len), value=True),
        )
        logits = padded.ours(padded.ids, padded.canvas, self_cond, attention_mask=padded.mask)
        hidden = padded.ours.encode(padded.ids, padded.mask).last_hidden
    assert rel_diff(logits, expected.logits) <= RTOL
    assert torch.equal(logits, expected.logits)
    real = padded.mask
    assert rel_diff(hidden[real], expected.encoder_last_hidden_state[real]) <= RTOL
    assert torch.equal(hidden[real], expected.encoder_last_hidden_state[real])
    # Each row's real positions also equal that row encoded alone.
    with torch.no_grad():
        for i, row in enumerate(padded.rows):
            alone = padded.ours.encode(row.ids).last_hidden[0]
            assert rel_diff(hidden[i][real[i]], alone) <= RTOL


# ---------------------------------------------------------------------- bf16
def build_bf16_reference(name: str, seed: int, monkeypatch) -> torch.nn.Module:
    """A bf16 transformers model as `from_pretrained(..., dtype=torch.bfloat16)` builds it.

    `build_reference(dtype=bf16)` ends in `model.to(bf16)`, which also rounds the RoPE `inv_freq`
    buffers to bf16 (up to 9% logit differences), whereas transformers' loader keeps them in fp32;
    we restore the fp32 buffers. The "mixed" config's moe_intermediate_size=12 makes a bf16 expert
    matrix row 24 bytes, which torch's CPU grouped_mm rejects ("strides should be multiple of 16
    bytes") in transformers and in ours alike, so the bf16 test uses 16 there.
    """
    if name == "mixed":
        monkeypatch.setitem(CONFIGS[name], "moe_intermediate_size", 16)
    reference = build_reference(name, seed, dtype=torch.bfloat16)
    fp32 = dict(build_reference(name, seed).named_buffers())
    for buf_name, _ in list(reference.named_buffers()):
        if buf_name.endswith("inv_freq"):
            owner, _, attr = buf_name.rpartition(".")
            reference.get_submodule(owner)._buffers[attr] = fp32[buf_name].clone()
    return reference


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bf16_logits_match_transformers(name, monkeypatch):
    worst = 0.0
    for seed in range(4):
        reference = build_bf16_reference(name, seed, monkeypatch)
        ours = HookedDiffusionGemma.from_pretrained(reference)
        assert ours.dtype == torch.bfloat16
        inputs = make_inputs(name, batch=2, prompt_len=2 * CONFIGS[name]["sliding_window"] + 1, seed=seed)
        for self_cond in (None, inputs.self_cond):
            with torch.no_grad():
                expected = reference(
                    input_ids=inputs.ids, decoder_input_ids=inputs.canvas, self_conditioning_logits=self_cond
                ).logits
                logits = ours(inputs.ids, inputs.canvas, self_cond)
            assert logits.dtype == torch.float32  # the soft-capped head runs in fp32
            worst = max(worst, rel_diff(logits, expected))
            assert torch.equal(logits, expected), f"bf16 seed {seed}: {rel_diff(logits, expected):.3g}"
    assert worst <= BF16_RTOL


def test_bf16_load_from_fp32_equals_bf16_reference():
    """Casting at load time (dtype=...) gives the same model as loading bf16 weights."""
    reference = build_reference("single_kv", seed=5)
    cast = HookedDiffusionGemma.from_pretrained(reference, dtype=torch.bfloat16)
    native = HookedDiffusionGemma.from_pretrained(reference.to(torch.bfloat16))
    inputs = make_inputs("single_kv", batch=2, prompt_len=9, seed=5)
    with torch.no_grad():
        a = cast(inputs.ids, inputs.canvas, inputs.self_cond)
        b = native(inputs.ids, inputs.canvas, inputs.self_cond)
    assert cast.dtype == torch.bfloat16
    assert torch.equal(a, b)
