"""A trace records the fingerprint of the model that generated it; replay_step refuses another model, and
works on a model whose parameters require grad."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from reference import build_pair

from diffusionlens import DenoisingTrace, HookedDiffusionGemma
from diffusionlens.weights.fingerprint import model_fingerprint

FIX = "Replay it on the model that generated it"


@pytest.fixture(scope="module")
def recorded(toy):
    ids = toy.to_tokens("squares 4 8:")
    torch.manual_seed(4)
    result, cache = toy.generate_with_cache(
        ids, names_filter="decoder.hook_logits", max_new_tokens=toy.cfg.canvas_length, max_denoising_steps=4,
        eos_token_id=None, progress=False,
    )  # fmt: skip
    return result, cache, ids


def test_a_trace_records_its_model_and_keeps_it_through_save_and_load(toy, recorded, tmp_path):
    result = recorded[0]
    assert result.trace.model_fingerprint == model_fingerprint(toy)
    assert set(result.trace.model_fingerprint) == {"config", "weights", "dtype"}
    result.trace.save(tmp_path)
    assert DenoisingTrace.load(tmp_path).model_fingerprint == result.trace.model_fingerprint


def test_the_same_checkpoint_loaded_again_has_the_same_fingerprint(toy):
    again = HookedDiffusionGemma.from_pretrained("toy", progress=False)
    assert model_fingerprint(again) == model_fingerprint(toy)
    assert model_fingerprint(copy.deepcopy(toy)) == model_fingerprint(toy)


def test_a_saved_trace_replays_on_a_fresh_load_of_its_model(recorded, tmp_path):
    result, cache, ids = recorded
    result.trace.save(tmp_path)
    fresh = HookedDiffusionGemma.from_pretrained("toy", progress=False)
    logits = fresh.replay_step(DenoisingTrace.load(tmp_path), ids, step=1)
    assert torch.equal(logits.detach(), cache.get("decoder.hook_logits", step=1))


def test_replay_on_other_weights_with_the_same_config_is_refused(toy, recorded, tmp_path):
    result, _, ids = recorded
    other = copy.deepcopy(toy)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(0)) * 1e-3)
    assert other.cfg == toy.cfg
    with pytest.raises(ValueError) as error:
        other.replay_step(result, ids, step=1)
    assert "another model: its weights differ (same config, other weights)" in str(error.value)
    assert FIX in str(error.value)
    result.trace.save(tmp_path)  # a saved trace is checked the same way
    with pytest.raises(ValueError, match="its weights differ"):
        other.replay_step(DenoisingTrace.load(tmp_path), ids, step=1)


def test_replay_after_the_weights_were_edited_in_place_is_refused(toy, recorded):
    result, _, ids = recorded
    edited = copy.deepcopy(toy)
    edited.replay_step(result, ids, step=1)  # the same weights: replays (and its fingerprint is remembered)
    with torch.no_grad():
        edited.decoder.blocks[0].mlp.down_proj.weight.mul_(0.5)
    with pytest.raises(ValueError, match=f"its weights differ.*{FIX}"):
        edited.replay_step(result, ids, step=1)


def test_replay_on_another_config_is_refused(recorded):
    result, _, ids = recorded
    other = build_pair("mixed")[1]
    with pytest.raises(ValueError, match=f"its config differs.*{FIX}"):
        other.replay_step(result, ids, step=1)


def test_replay_in_another_dtype_is_refused(recorded):
    result, _, ids = recorded
    half = HookedDiffusionGemma.from_pretrained("toy", progress=False, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=f"the trace was made in float32, this model is bfloat16.*{FIX}"):
        half.replay_step(result, ids, step=1)


def test_a_trace_without_a_fingerprint_replays_with_a_warning(toy, recorded):
    result, cache, ids = recorded
    bare = DenoisingTrace(result.trace.canvases, result.trace.prompt_length, result.trace.settings)
    with pytest.warns(UserWarning, match="records no model fingerprint"):
        logits = toy.replay_step(bare, ids, step=1)
    assert torch.equal(logits.detach(), cache.get("decoder.hook_logits", step=1))


def test_a_malformed_fingerprint_in_trace_json_is_refused(recorded, tmp_path):
    recorded[0].trace.save(tmp_path)
    meta = json.loads((tmp_path / "trace.json").read_text())
    meta["model_fingerprint"] = ["not", "a", "mapping"]
    (tmp_path / "trace.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="model_fingerprint must map names to digests"):
        DenoisingTrace.load(tmp_path)


def test_replay_step_works_when_parameters_require_grad(toy, recorded):
    result, cache, ids = recorded
    trainable = copy.deepcopy(toy).requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logits = trainable.replay_step(result, ids, step=1)
    assert torch.equal(logits.detach(), cache.get("decoder.hook_logits", step=1))
    logits[0, 3].logsumexp(-1).backward()
    grad = trainable.decoder.blocks[0].mlp.down_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0
