"""Port of TransformerLens's tests/integration/test_start_at_layer.py (TransformerLensOrg/TransformerLens at
commit 4cd36aaeb5dad931d085bd5d46a12b402fe15272), assertions unchanged.

Adaptations: the config as in test_parity_stop_at_layer.py (d_model 16, d_head 8); TL's
`model.input_to_embed(tokens)` becomes the decoder's block-0 input `model.decoder.embed_canvas(canvas, None)`,
and `model(embed, start_at_layer=l)` becomes `model(prompt, embed, start_at_layer=l)` (the encoder runs
whole; `start_at_layer` acts on the decoder pass). Hook names carry the `decoder.` prefix and there is no
`hook_pos_embed` (RoPE). `test_start_at_layer_kwargs` (GPT-2's tokenizer and shortformer positional
embeddings, which this model does not have) keeps its claim, that a pass started at block 0 from the
embedding gives the same loss as the plain pass, with a left-padded prompt and its attention mask.
"""

from typing import Any

import pytest
import torch

from diffusionlens import DiffusionGemmaConfig, HookedDiffusionGemma


def make_model(n_layers=3):
    cfg = DiffusionGemmaConfig(
        num_hidden_layers=n_layers,
        intermediate_size=8,
        hidden_size=16,
        head_dim=8,
        global_head_dim=8,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_global_key_value_heads=2,
        max_position_embeddings=40,
        sliding_window=20,
        vocab_size=50,
        num_experts=2,
        top_k_experts=1,
        moe_intermediate_size=8,
        canvas_length=10,
    )
    return HookedDiffusionGemma.from_config(cfg)


def decoder_keys(cache):
    return [key.removeprefix("decoder.") for key in cache.keys() if key.startswith("decoder.")]


@pytest.fixture
def setup_data() -> dict[str, Any]:
    model = make_model()
    rand_input = torch.randint(0, 20, (2, 10))
    canvas = torch.randint(0, 20, (2, 10))
    with torch.no_grad():
        rand_embed = model.decoder.embed_canvas(canvas, None)
    return {"model": model, "rand_input": rand_input, "canvas": canvas, "rand_embed": rand_embed}


def test_start_at_layer_1(setup_data: dict[str, Any]):
    model, prompt, rand_embed = setup_data["model"], setup_data["rand_input"], setup_data["rand_embed"]
    output, cache = model.run_with_cache(prompt, rand_embed, start_at_layer=1)

    keys = decoder_keys(cache)
    assert output is not None
    assert "hook_embed" not in keys
    assert "blocks.0.hook_resid_pre" not in keys
    assert "blocks.1.hook_resid_pre" in keys
    assert "ln_final.hook_normalized" in keys


def test_run_with_hooks(setup_data: dict[str, Any]):
    model, prompt, rand_embed = setup_data["model"], setup_data["rand_input"], setup_data["rand_embed"]

    counting_list = []

    def count_hook(activation, hook):
        counting_list.append(len(counting_list))
        return None

    output = model.run_with_hooks(
        prompt,
        rand_embed,
        start_at_layer=1,
        fwd_hooks=[
            ("decoder.hook_embed", count_hook),
            ("decoder.blocks.0.attn.hook_k", count_hook),
            ("decoder.blocks.1.mlp.hook_pre", count_hook),
            ("decoder.blocks.2.attn.hook_k", count_hook),
            ("decoder.blocks.2.mlp.hook_pre", count_hook),
        ],
    )

    assert output is not None
    assert len(counting_list) == 3


def test_manual_hooks(setup_data: dict[str, Any]):
    model, prompt, rand_embed = setup_data["model"], setup_data["rand_input"], setup_data["rand_embed"]
    counting_list = []

    def count_hook(activation, hook):
        counting_list.append(len(counting_list))
        return None

    model.decoder.hook_embed.add_hook(count_hook)
    model.decoder.blocks[0].hook_mlp_out.add_hook(count_hook)
    model.decoder.blocks[1].hook_resid_mid.add_hook(count_hook)
    model.decoder.blocks[2].attn.hook_z.add_hook(count_hook)

    output = model(prompt, rand_embed, start_at_layer=-2)
    assert output is not None
    assert len(counting_list) == 2


def test_start_at_final(setup_data: dict[str, Any]):
    model, prompt, rand_embed = setup_data["model"], setup_data["rand_input"], setup_data["rand_embed"]
    output, cache = model.run_with_cache(prompt, rand_embed, start_at_layer=-1)

    keys = decoder_keys(cache)
    assert output is not None
    assert "hook_embed" not in keys
    assert "blocks.0.hook_resid_pre" not in keys
    assert "blocks.0.hook_resid_post" not in keys
    assert "blocks.1.hook_resid_pre" not in keys
    assert "blocks.1.hook_resid_post" not in keys
    assert "blocks.2.hook_resid_pre" in keys
    assert "blocks.2.hook_resid_post" in keys
    assert "blocks.3.hook_resid_pre" not in keys
    assert "ln_final.hook_normalized" in keys


def test_no_start_logit_output(setup_data: dict[str, Any]):
    model, rand_input, canvas = setup_data["model"], setup_data["rand_input"], setup_data["canvas"]
    output, cache = model.run_with_cache(rand_input, canvas, start_at_layer=None)

    assert output is not None
    assert isinstance(output, torch.Tensor)
    assert output.shape == (2, 10, 50)

    keys = decoder_keys(cache)
    assert "hook_embed" in keys
    assert "blocks.0.hook_resid_pre" in keys
    assert "blocks.0.hook_resid_post" in keys
    assert "blocks.1.hook_resid_pre" in keys
    assert "blocks.1.hook_resid_post" in keys
    assert "blocks.2.hook_resid_pre" in keys
    assert "blocks.2.hook_resid_post" in keys
    assert "ln_final.hook_normalized" in keys


def test_no_start_none_output(setup_data: dict[str, Any]):
    model, rand_input, canvas = setup_data["model"], setup_data["rand_input"], setup_data["canvas"]
    output, cache = model.run_with_cache(rand_input, canvas, start_at_layer=None, return_type=None)

    assert output is None
    keys = decoder_keys(cache)
    assert "hook_embed" in keys
    assert "blocks.0.hook_resid_pre" in keys
    assert "blocks.0.hook_resid_post" in keys
    assert "blocks.1.hook_resid_pre" in keys
    assert "blocks.1.hook_resid_post" in keys
    assert "blocks.2.hook_resid_pre" in keys
    assert "blocks.2.hook_resid_post" in keys
    assert "ln_final.hook_normalized" in keys


def test_start_and_stop(setup_data: dict[str, Any]):
    model, prompt, rand_embed = setup_data["model"], setup_data["rand_input"], setup_data["rand_embed"]
    output, cache = model.run_with_cache(prompt, rand_embed, start_at_layer=1, stop_at_layer=2)

    keys = decoder_keys(cache)
    assert torch.allclose(output, cache["decoder.blocks.1.hook_resid_post"])
    assert "hook_embed" not in keys
    assert "blocks.0.hook_resid_pre" not in keys
    assert "blocks.0.hook_resid_post" not in keys
    assert "blocks.1.hook_resid_pre" in keys
    assert "blocks.1.hook_resid_post" in keys
    assert "blocks.2.hook_resid_pre" not in keys
    assert "blocks.2.hook_resid_post" not in keys
    assert "blocks.3.hook_resid_pre" not in keys
    assert "ln_final.hook_normalized" not in keys


def test_start_at_layer_kwargs():
    model = make_model()
    tokens = torch.randint(3, 50, (2, 10))
    attention_mask = torch.ones_like(tokens)
    attention_mask[0, :3] = 0  # left padding
    canvas = torch.randint(3, 50, (2, 10))
    with torch.no_grad():
        rand_embed = model.decoder.embed_canvas(canvas, None)

    start_at_layer_output = model(
        tokens, rand_embed, attention_mask=attention_mask, start_at_layer=0, return_type="loss", targets=canvas
    )
    normal_output = model(tokens, canvas, attention_mask=attention_mask, return_type="loss", targets=canvas)

    assert start_at_layer_output is not None
    assert normal_output is not None
    assert torch.allclose(start_at_layer_output, normal_output)
