"""Port of TransformerLens's tests/integration/test_stop_at_layer.py (TransformerLensOrg/TransformerLens at
commit 4cd36aaeb5dad931d085bd5d46a12b402fe15272), assertions unchanged.

Adaptations: TL's `HookedTransformerConfig` becomes a random `DiffusionGemmaConfig` of the same depth with
d_model 16 and d_head 8 (TL's d_head 5 is odd, and RoPE rotates pairs); `model(tokens)` becomes
`model(tokens, canvas)` and hook names carry the `decoder.` prefix: `stop_at_layer` acts on the decoder pass,
while the encoder runs whole (the decoder's blocks read its keys and values), so the encoder's values are
in every cache and the key check looks at the decoder's. There is no positional embedding (RoPE), so TL's
`hook_pos_embed` has no counterpart; the decoder's embedding path is `hook_embed` and the
self-conditioning hooks (`self_cond.*`).
"""

import torch

from diffusionlens import DiffusionGemmaConfig, HookedDiffusionGemma


def make_model(n_layers):
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


def inputs():
    return torch.randint(0, 20, (2, 10)), torch.randint(0, 20, (2, 10))


def decoder_keys(cache):
    return [key.removeprefix("decoder.") for key in cache.keys() if key.startswith("decoder.")]


def test_stop_at_embed():
    model = make_model(3)
    rand_input, canvas = inputs()

    _, normal_cache = model.run_with_cache(rand_input, canvas)
    output, cache = model.run_with_cache(rand_input, canvas, stop_at_layer=0)

    assert torch.allclose(output, normal_cache["decoder.blocks.0.hook_resid_pre"])
    assert "hook_embed" in decoder_keys(cache)
    assert "blocks.0.hook_resid_pre" not in decoder_keys(cache)
    assert "ln_final.hook_normalized" not in decoder_keys(cache)


def test_run_with_hooks():
    model = make_model(3)
    rand_input, canvas = inputs()

    counting_list = []

    def count_hook(activation, hook):
        counting_list.append(len(counting_list))
        return None

    output = model.run_with_hooks(
        rand_input,
        canvas,
        stop_at_layer=1,
        fwd_hooks=[
            ("decoder.hook_embed", count_hook),
            ("decoder.blocks.0.attn.hook_k", count_hook),
            ("decoder.blocks.1.mlp.hook_pre", count_hook),
        ],
    )

    _, normal_cache = model.run_with_cache(rand_input, canvas, stop_at_layer=1)
    assert torch.allclose(output, normal_cache["decoder.blocks.0.hook_resid_post"])
    assert len(counting_list) == 2


def test_manual_hooks():
    model = make_model(3)
    rand_input, canvas = inputs()
    _, normal_cache = model.run_with_cache(rand_input, canvas)

    counting_list = []

    def count_hook(activation, hook):
        counting_list.append(len(counting_list))
        return None

    model.decoder.hook_embed.add_hook(count_hook)
    model.decoder.blocks[0].hook_mlp_out.add_hook(count_hook)
    model.decoder.blocks[1].hook_resid_mid.add_hook(count_hook)
    model.decoder.blocks[2].attn.hook_z.add_hook(count_hook)

    output = model(rand_input, canvas, stop_at_layer=-1)
    assert torch.allclose(output, normal_cache["decoder.blocks.1.hook_resid_post"])
    assert len(counting_list) == 3


def test_stop_at_layer_1():
    model = make_model(3)
    rand_input, canvas = inputs()

    _, normal_cache = model.run_with_cache(rand_input, canvas)
    output, cache = model.run_with_cache(rand_input, canvas, stop_at_layer=1)

    assert torch.allclose(output, normal_cache["decoder.blocks.0.hook_resid_post"])
    keys = decoder_keys(cache)
    assert "hook_embed" in keys
    assert "blocks.0.hook_resid_pre" in keys
    assert "blocks.0.hook_resid_post" in keys
    assert "blocks.1.hook_resid_pre" not in keys
    assert "ln_final.hook_normalized" not in keys
    for key in keys:
        if key.startswith("blocks.0"):
            continue
        elif key in ["hook_embed"] or key.startswith("self_cond."):
            continue
        else:
            raise AssertionError(f"Unexpected key {key} in cache.")


def test_stop_at_final():
    model = make_model(4)
    rand_input, canvas = inputs()

    _, normal_cache = model.run_with_cache(rand_input, canvas)
    output, cache = model.run_with_cache(rand_input, canvas, stop_at_layer=-1)

    assert torch.allclose(output, normal_cache["decoder.blocks.2.hook_resid_post"])
    keys = decoder_keys(cache)
    assert "hook_embed" in keys
    assert "blocks.0.hook_resid_pre" in keys
    assert "blocks.0.hook_resid_post" in keys
    assert "blocks.1.hook_resid_pre" in keys
    assert "blocks.1.hook_resid_post" in keys
    assert "blocks.2.hook_resid_pre" in keys
    assert "blocks.2.hook_resid_post" in keys
    assert "blocks.3.hook_resid_pre" not in keys
    assert "ln_final.hook_normalized" not in keys


def test_no_stop_logit_output():
    model = make_model(3)
    rand_input, canvas = inputs()

    normal_output = model(rand_input, canvas)
    output, cache = model.run_with_cache(rand_input, canvas, stop_at_layer=None)

    assert torch.allclose(output, normal_output)
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


def test_no_stop_no_output():
    model = make_model(3)
    rand_input, canvas = inputs()

    output, cache = model.run_with_cache(rand_input, canvas, stop_at_layer=None, return_type=None)

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
