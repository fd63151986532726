"""Port of TransformerLens's tests/integration/test_cache_pos_slice.py (TransformerLensOrg/TransformerLens at
commit 4cd36aaeb5dad931d085bd5d46a12b402fe15272), assertions unchanged.

Adaptations: the pretrained tiny-stories-1M becomes the shipped toy model and `run_with_cache(prompt)`
becomes `run_with_cache(ids, canvas)`; `pos_slice` picks canvas positions, so TL's positions
(0, the middle, the last, -1) are taken over the canvas. The toy has no learned positional embedding (RoPE),
so TL's `pos_embed` assertions have nothing to read; the pre-norms `ln1` / `ln2` have no scale hook, so
TL's `scale` assertions read the post-norms that have one (`ln1_post`, `ln2_post`). The 26 per-layer
assertions of TL's file are written as one table, each `torch.equal` as in TL.
"""

import pytest
import torch

prompt = "squares 4 8:"

# (TL's key, the position axis of its value with the batch axis) for every per-layer assertion of TL's file.
PER_LAYER = [
    (("resid_pre",), 1),
    (("resid_post",), 1),
    (("resid_mid",), 1),
    (("scale", "ln1_post"), 1),
    (("scale", "ln2_post"), 1),
    (("normalized", "ln1"), 1),
    (("normalized", "ln2"), 1),
    (("q",), 1),
    (("k",), 1),
    (("v",), 1),
    (("z",), 1),
    (("attn_scores",), 2),
    (("pattern",), 2),
    (("attn_out",), 1),
    (("pre",), 1),
    (("post",), 1),
    (("mlp_out",), 1),
]


@pytest.fixture(scope="module")
def setup(toy_pass):
    model, ids, canvas = toy_pass
    cfg = model.cfg
    config = {
        "d_model": cfg.hidden_size,
        "d_head": cfg.layer_head_dim(0),
        "n_heads": cfg.num_attention_heads,
        "n_layers": cfg.num_hidden_layers,
    }
    return model, ids, canvas, config


def key(name, layer):
    return (name[0], layer, *name[1:])


def positions(canvas):
    num_tokens = canvas.shape[1]
    # Test only a sample of positions to reduce test time
    return [0, num_tokens // 2, num_tokens - 1, -1]


@torch.no_grad()
def test_run_with_cache_pos_slice_keep_batch(setup):
    model, ids, canvas, model_config = setup
    _, cache_no_slice = model.run_with_cache(ids, canvas)
    d_model, d_head, n_heads, n_layers = (model_config[k] for k in ("d_model", "d_head", "n_heads", "n_layers"))

    for i in positions(canvas):
        _, cache_with_slice = model.run_with_cache(ids, canvas, pos_slice=i)

        assert cache_with_slice["embed"].shape == torch.Size([1, 1, d_model])
        assert cache_with_slice["q", 0].shape == torch.Size([1, 1, n_heads, d_head])

        assert torch.equal(cache_no_slice["embed"][0, i, :], cache_with_slice["embed"][0, 0, :])

        for layer in range(n_layers):
            for name, axis in PER_LAYER:
                full, sliced = cache_no_slice[key(name, layer)][0], cache_with_slice[key(name, layer)][0]
                assert torch.equal(full.select(axis - 1, i), sliced.select(axis - 1, 0)), (name, layer, i)


@torch.no_grad()
def test_run_with_cache_pos_slice_remove_batch(setup):
    model, ids, canvas, model_config = setup
    _, cache_no_slice = model.run_with_cache(ids, canvas, remove_batch_dim=True)
    d_model, d_head, n_heads, n_layers = (model_config[k] for k in ("d_model", "d_head", "n_heads", "n_layers"))

    for i in positions(canvas):
        _, cache_with_slice = model.run_with_cache(ids, canvas, remove_batch_dim=True, pos_slice=i)

        assert cache_with_slice["embed"].shape == torch.Size([1, d_model])
        assert cache_with_slice["q", 0].shape == torch.Size([1, n_heads, d_head])

        assert torch.equal(cache_no_slice["embed"][i, :], cache_with_slice["embed"][0, :])

        for layer in range(n_layers):
            for name, axis in PER_LAYER:
                full, sliced = cache_no_slice[key(name, layer)], cache_with_slice[key(name, layer)]
                assert torch.equal(full.select(axis - 1, i), sliced.select(axis - 1, 0)), (name, layer, i)
