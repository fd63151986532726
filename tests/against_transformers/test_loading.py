"""Checkpoint round trips with transformers (single and sharded safetensors), clear errors for
broken checkpoints, and the config mapping.

Note on exactness: torch's CPU `grouped_mm` (the MoE experts, in transformers and in ours) rounds
differently when an expert gets a single token and its weight is not 16-byte aligned, which tensors
read from a safetensors file often are. A model loaded from disk is therefore bit-identical to
another model loaded from the same files (ours or transformers'), and within ~1e-6 of the in-memory
model it was saved from; the tests assert exactly that.
"""

from __future__ import annotations

import importlib
import json
import logging
import pickle
from pathlib import Path

import pytest
import torch
from reference import CANVAS, CONFIGS, build_pair, build_reference
from safetensors.torch import load_file, save_file
from transformers import DiffusionGemmaConfig as HFConfig
from transformers import DiffusionGemmaForBlockDiffusion

from diffusionlens import DiffusionGemmaConfig, HookedDiffusionGemma
from diffusionlens.weights.checkpoint import CheckpointError

NAME = "mixed"
RTOL = 1e-5  # in-memory vs loaded-from-disk (see the module docstring)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def pair():
    return build_pair(NAME, seed=7)


@pytest.fixture(scope="module")
def inputs():
    vocab = CONFIGS[NAME]["vocab_size"]
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, vocab, (2, 9), generator=g)
    canvas = torch.randint(0, vocab, (2, CANVAS[NAME]), generator=g)
    self_cond = 3.0 * torch.randn(2, CANVAS[NAME], vocab, generator=g)
    return ids, canvas, self_cond


def ours_logits(model, inputs):
    with torch.no_grad():
        return model(*inputs)


def hf_logits(model, inputs):
    ids, canvas, self_cond = inputs
    with torch.no_grad():
        return model(input_ids=ids, decoder_input_ids=canvas, self_conditioning_logits=self_cond).logits


def text_state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "vision" not in k}


def assert_same_text_weights(loaded, original):
    a, b = text_state(loaded), text_state(original)
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------- round trips
@pytest.mark.parametrize("shard", [None, "20KB"], ids=["single", "sharded"])
def test_save_pretrained_loads_in_transformers_and_ours(pair, inputs, tmp_path, shard):
    reference, ours = pair
    kwargs = {} if shard is None else {"max_shard_size": shard}
    ours.save_pretrained(tmp_path, **kwargs)
    index = tmp_path / "model.safetensors.index.json"
    if shard is None:
        assert (tmp_path / "model.safetensors").exists() and not index.exists()
    else:
        assert index.exists() and not (tmp_path / "model.safetensors").exists()
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
        assert len(shards) > 1
        assert all((tmp_path / s).exists() for s in shards)
        assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == shards
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path).eval()
    assert_same_text_weights(hf, reference)
    reloaded = HookedDiffusionGemma.from_pretrained(tmp_path, progress=False)
    assert reloaded.cfg == ours.cfg

    expected = hf_logits(reference, inputs)
    from_hf = hf_logits(hf, inputs)
    from_ours = ours_logits(reloaded, inputs)
    assert torch.equal(from_ours, from_hf)
    assert rel_diff(from_ours, expected) <= RTOL
    assert torch.equal(ours_logits(ours, inputs), expected)


@pytest.mark.parametrize("shard", [None, "20KB"], ids=["single", "sharded"])
def test_load_transformers_checkpoint_skips_vision_tower(pair, inputs, tmp_path, shard, caplog):
    reference, _ = pair
    kwargs = {} if shard is None else {"max_shard_size": shard}
    reference.save_pretrained(tmp_path, **kwargs)
    assert (tmp_path / "model.safetensors.index.json").exists() == (shard is not None)
    caplog.set_level(logging.INFO, logger="diffusionlens")
    ours = HookedDiffusionGemma.from_pretrained(tmp_path, progress=False)
    vision_logs = [r for r in caplog.records if r.name == "diffusionlens" and "vision" in r.getMessage()]
    assert vision_logs and vision_logs[0].levelno == logging.INFO
    assert not any("vision" in n for n, _ in ours.named_parameters())
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path).eval()
    assert torch.equal(ours_logits(ours, inputs), hf_logits(hf, inputs))
    assert rel_diff(ours_logits(ours, inputs), hf_logits(reference, inputs)) <= RTOL


def test_from_config_is_deterministic(inputs):
    cfg = DiffusionGemmaConfig.from_hf(build_reference(NAME).config)
    a = HookedDiffusionGemma.from_config(cfg, seed=0)
    b = HookedDiffusionGemma.from_config(cfg, seed=0)
    c = HookedDiffusionGemma.from_config(cfg, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert torch.equal(ours_logits(a, inputs), ours_logits(b, inputs))
    assert not torch.equal(ours_logits(a, inputs), ours_logits(c, inputs))
    # The encoder shares the decoder's weights, as in the checkpoint.
    assert a.encoder.blocks[0].attn.q_proj.weight is a.decoder.blocks[0].attn.q_proj.weight


# ---------------------------------------------------------------------- broken checkpoints
@pytest.fixture
def saved(pair, tmp_path) -> Path:
    pair[1].save_pretrained(tmp_path)
    return tmp_path


def rewrite(directory: Path, edit) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def load_error(directory: Path) -> str:
    with pytest.raises(CheckpointError) as err:
        HookedDiffusionGemma.from_pretrained(directory, progress=False)
    return str(err.value)


def test_missing_tensor_is_named(saved):
    key = "model.decoder.layers.2.self_attn.k_norm.weight"
    rewrite(saved, lambda t: t.pop(key))
    message = load_error(saved)
    assert "missing" in message and key in message


def test_missing_tensor_in_a_shard_is_named(pair, tmp_path):
    pair[1].save_pretrained(tmp_path, max_shard_size="20KB")
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.decoder.layers.1.router.per_expert_scale"
    shard = tmp_path / weight_map[key]
    tensors = load_file(str(shard))
    del tensors[key]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    message = load_error(tmp_path)
    assert "missing" in message and key in message


def test_unexpected_tensor_is_named(saved):
    key = "model.decoder.layers.0.self_attn.bogus.weight"
    rewrite(saved, lambda t: t.__setitem__(key, torch.zeros(3)))
    message = load_error(saved)
    assert "unexpected" in message and key in message


def test_misshaped_tensor_is_named(saved):
    key = "model.decoder.layers.3.mlp.up_proj.weight"
    rewrite(saved, lambda t: t.__setitem__(key, t[key][:-1].clone()))
    message = load_error(saved)
    assert key in message and "shape" in message


def test_truncated_file(saved):
    path = saved / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    message = load_error(saved)
    assert "truncated" in message or "corrupted" in message
    assert "model.safetensors" in message


def test_index_naming_a_missing_shard(pair, tmp_path):
    pair[1].save_pretrained(tmp_path, max_shard_size="20KB")
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    gone = sorted(set(weight_map.values()))[1]
    (tmp_path / gone).unlink()
    assert gone in load_error(tmp_path)


def test_pickled_checkpoint_is_refused_without_unpickling(saved, monkeypatch):
    (saved / "model.safetensors").unlink()
    (saved / "pytorch_model.bin").write_bytes(b"\x80\x04 these bytes are never unpickled")

    def forbidden(*args, **kwargs):
        raise AssertionError("a pickle was opened")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    message = load_error(saved)
    assert "pytorch_model.bin" in message and "unpickle" in message


def test_empty_directory(tmp_path, pair):
    (tmp_path / "config.json").write_text(json.dumps(pair[1].cfg.to_hf()))
    assert "model.safetensors" in load_error(tmp_path)


def test_config_that_does_not_match_the_weights(saved):
    config = json.loads((saved / "config.json").read_text())
    config["text_config"]["hidden_size"] = 40
    (saved / "config.json").write_text(json.dumps(config))
    message = load_error(saved)
    assert "config" in message
    assert "model.decoder.embed_tokens.weight" in message
    assert "(97, 32)" in message and "(97, 40)" in message


# ---------------------------------------------------------------------- config
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_round_trip(name):
    hf_config = build_reference(name).config
    cfg = DiffusionGemmaConfig.from_hf(hf_config)
    text = CONFIGS[name]
    assert cfg.hidden_size == text["hidden_size"] and cfg.layer_types == tuple(text["layer_types"])
    assert cfg.global_head_dim == text["global_head_dim"]
    assert cfg.num_global_key_value_heads == text["num_global_key_value_heads"]
    assert cfg.canvas_length == CANVAS[name]
    assert DiffusionGemmaConfig.from_hf(cfg.to_hf()) == cfg
    # transformers itself reads our config.json back into the same model shape.
    rebuilt = HFConfig.from_dict(cfg.to_hf())
    assert DiffusionGemmaConfig.from_hf(rebuilt) == cfg
    for key in ("hidden_size", "num_hidden_layers", "sliding_window", "num_experts", "top_k_experts"):
        assert getattr(rebuilt.text_config, key) == getattr(hf_config.text_config, key)
    assert rebuilt.text_config.layer_types == hf_config.text_config.layer_types


def test_config_validation_names_the_field():
    base = DiffusionGemmaConfig.from_hf(build_reference(NAME).config)
    with pytest.raises(ValueError, match="layer_types"):
        base.replace(layer_types=base.layer_types[:-1])
    with pytest.raises(ValueError, match="num_key_value_heads"):
        base.replace(num_key_value_heads=3)
    with pytest.raises(ValueError, match="num_global_key_value_heads"):
        base.replace(num_global_key_value_heads=3)
    with pytest.raises(ValueError, match="top_k_experts"):
        base.replace(top_k_experts=base.num_experts + 1)


def test_a_layout_ending_on_a_sliding_layer_is_refused_at_the_transformers_boundary(tmp_path):
    """transformers forces the last layer to full attention (a full layer has other shapes), so a
    layout ending on a sliding layer would be another model there: writing or reading one refuses."""
    base = DiffusionGemmaConfig.from_hf(build_reference(NAME).config)
    sliding_last = base.replace(layer_types=(*base.layer_types[:-1], "sliding_attention"))
    text = base.to_hf_text_dict()
    text["layer_types"] = list(sliding_last.layer_types)
    # transformers forces the list it is given in place: hand it a copy.
    forced = HFConfig.from_dict({**base.to_hf(), "text_config": {**text, "layer_types": list(text["layer_types"])}})
    assert forced.text_config.layer_types[-1] == "full_attention"  # what transformers would silently do

    with pytest.raises(ValueError, match="last layer must be 'full_attention'"):
        sliding_last.to_hf()
    with pytest.raises(ValueError, match="End layer_types with 'full_attention'"):
        DiffusionGemmaConfig.from_hf({**base.to_hf(), "text_config": text})
    model = HookedDiffusionGemma.from_config(sliding_last.replace(num_experts=2, top_k_experts=1))
    with pytest.raises(ValueError, match="no transformers counterpart"):
        model.save_pretrained(tmp_path / "sliding_last")
    assert not (tmp_path / "sliding_last" / "model.safetensors").exists()


def test_loading_builds_a_single_model(monkeypatch):
    """Loading must not build a second (full-size) model, e.g. to recompute derived buffers."""
    reference = build_reference("mixed")
    built = []
    original = HookedDiffusionGemma.__init__

    def counting_init(self, cfg):
        built.append(torch.get_default_device())
        original(self, cfg)

    monkeypatch.setattr(HookedDiffusionGemma, "__init__", counting_init)
    model = HookedDiffusionGemma.from_pretrained(reference, progress=False)
    assert built == [torch.device("meta")]
    assert not any(t.is_meta for t in model.state_dict().values())
    assert model.decoder.rotary.full_attention_inv_freq.device.type == "cpu"


def test_block_norms_map_through_the_one_checkpoint_table():
    from diffusionlens.components import RMSNorm
    from diffusionlens.components.block import NORMS, Block
    from diffusionlens.weights.checkpoint import block_checkpoint_name

    cfg = DiffusionGemmaConfig.from_hf(build_reference("mixed").config)
    block = Block(cfg, 0)
    norms = [name for name, module in block.named_children() if isinstance(module, RMSNorm)]
    assert norms == list(NORMS)
    names = {norm: block_checkpoint_name(f"{norm}.weight") for norm in NORMS}
    assert names["ln1"] == "input_layernorm.weight" and names["ln2_post_mlp"] == "post_feedforward_layernorm_1.weight"
    assert len(set(names.values())) == len(NORMS)
    # one table of checkpoint names (weights/checkpoint.py), no second copy kept on the block module
    assert not hasattr(importlib.import_module("diffusionlens.components.block"), "NORM_NAMES")


def test_flat_config_dict_may_carry_canvas_length():
    flat = {**CONFIGS["mixed"], "canvas_length": 5}
    cfg = DiffusionGemmaConfig.from_hf(flat)
    assert cfg.canvas_length == 5
    assert HookedDiffusionGemma.from_config(flat).cfg.canvas_length == 5
