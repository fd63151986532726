"""model.tokenizer, to_tokens, to_string, to_str_tokens, and the tokenizer travelling with a checkpoint."""

from __future__ import annotations

import pytest
import torch

from diffusionlens import DiffusionGemmaConfig, HookedDiffusionGemma
from diffusionlens.toy import build_tokenizer

CFG = DiffusionGemmaConfig(
    vocab_size=44,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    global_head_dim=8,
    num_global_key_value_heads=1,
    layer_types=("sliding_attention", "full_attention"),
    sliding_window=4,
    num_experts=2,
    top_k_experts=1,
    moe_intermediate_size=8,
    canvas_length=6,
    max_position_embeddings=128,
)


def test_token_helpers_and_checkpoint_tokenizer(tmp_path):
    model = HookedDiffusionGemma.from_config(CFG)
    with pytest.raises(ValueError, match="no tokenizer"):
        model.to_tokens("1+2=")
    tokenizer = build_tokenizer()
    model.tokenizer = tokenizer
    tokens = model.to_tokens(["1+2=", "10+20="])
    assert tokens.shape == (2, 7)
    assert tokens[0, :2].tolist() == [0, 0]  # left padded
    assert tokens[1].tolist() == tokenizer("10+20=")["input_ids"]
    assert model.to_string(tokens[1], skip_special_tokens=True) == "10+20="
    assert model.to_str_tokens("1+2=")[1:] == ["1", "+", "2", "="]
    model.save_pretrained(tmp_path)
    loaded = HookedDiffusionGemma.from_pretrained(tmp_path, progress=False)
    assert loaded.to_tokens("7+8=").tolist() == model.to_tokens("7+8=").tolist()
    canvas = torch.randint(0, 44, (1, 6), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded(tokens[1:], canvas), model(tokens[1:], canvas))


def test_docs_hook_reference_lists_exactly_the_hook_dict():
    from pathlib import Path

    from diffusionlens.hooks.shapes import hook_reference_markdown
    from diffusionlens.toy.train import toy_config

    page = (Path(__file__).parents[2] / "docs" / "hook_reference.md").read_text()
    listed = {line.split("`")[1] for line in page.splitlines() if line.startswith("| `")}
    assert listed == set(HookedDiffusionGemma.from_pretrained("toy", progress=False).hook_dict)
    assert page.endswith(hook_reference_markdown(toy_config()))  # regenerated whenever hooks change
