"""Port of TransformerLens's tests/unit/test_use_attn_result.py (TransformerLensOrg/TransformerLens at commit
4cd36aaeb5dad931d085bd5d46a12b402fe15272), assertions unchanged.

Adaptations: hook names carry the `decoder.` prefix; TL's attention-only `HookedTransformerConfig` becomes
a one-layer random `DiffusionGemmaConfig` of the same attention sizes (DiffusionGemma has no attention-only
variant; its MLP and experts are left as they are); `model(x)` becomes `model(x, x)` (prompt, canvas). TL's
`hook_attn_out` is the attention's output; here `hook_attn_out` is that output after the block's
post-attention norm `ln1_post`, so the head sum is compared through `ln1_post`. Plus one test of TL's
`check_hooks_to_add`: a hook on `hook_result` while the switch is off is refused.
"""

import pytest
import torch

from diffusionlens import DiffusionGemmaConfig, HookedDiffusionGemma


def tiny_config(d_model, d_head, n_heads, n_key_value_heads, n_layers, d_vocab, n_ctx):
    return DiffusionGemmaConfig(
        vocab_size=d_vocab,
        hidden_size=d_model,
        intermediate_size=32,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_key_value_heads,
        head_dim=d_head,
        global_head_dim=d_head,
        num_global_key_value_heads=n_key_value_heads,
        layer_types=("sliding_attention",) * n_layers,
        sliding_window=n_ctx,
        num_experts=2,
        top_k_experts=1,
        moe_intermediate_size=16,
        canvas_length=8,
        max_position_embeddings=n_ctx,
    )


def check_head_results(cfg, n_heads, d_model):
    model = HookedDiffusionGemma.from_config(cfg)

    x = torch.arange(1, 9).unsqueeze(0)
    normal_output = model(x, x)

    model.set_use_attn_result(True)

    split_output, cache = model.run_with_cache(x, x)

    # Switching to the per-head compute branch must not change the output.
    assert torch.allclose(normal_output, split_output, atol=1e-6)

    result = cache["decoder.blocks.0.attn.hook_result"]
    assert result.shape == (x.shape[0], x.shape[1], n_heads, d_model)
    b_O = model.decoder.blocks[0].attn.o_proj.bias
    summed = result.sum(dim=2) + (0 if b_O is None else b_O)
    assert torch.allclose(model.decoder.blocks[0].ln1_post(summed), cache["decoder.blocks.0.hook_attn_out"], atol=1e-5)


def test_atten_result_normal_attn_correct():
    """Enabling use_attn_result exposes per-head hook_result that sums back to attn output (normal attention)."""
    d_model, d_head, n_heads, n_ctx, n_layers, d_vocab = 128, 8, 16, 128, 1, 10
    cfg = tiny_config(d_model, d_head, n_heads, n_heads, n_layers, d_vocab, n_ctx)
    check_head_results(cfg, n_heads, d_model)


def test_atten_result_grouped_query_attn_correct():
    """Enabling use_attn_result exposes per-head hook_result that sums back to attn output (grouped-query attention)."""
    d_model, d_head, n_heads, n_ctx, n_key_value_heads, n_layers, d_vocab = 128, 8, 16, 128, 2, 1, 10
    cfg = tiny_config(d_model, d_head, n_heads, n_key_value_heads, n_layers, d_vocab, n_ctx)
    # fires with shape [batch, pos, n_heads, d_model] (one row per query head even
    # under GQA), and head-sum (plus b_O) reconstructs the attention block output.
    check_head_results(cfg, n_heads, d_model)


def test_hook_on_hook_result_without_use_attn_result_is_refused():
    """TL's HookedTransformer.check_hooks_to_add: 'Cannot add hook ... if use_attn_result_hook is False'."""
    cfg = tiny_config(128, 8, 16, 2, 1, 10, 128)
    model = HookedDiffusionGemma.from_config(cfg)
    x = torch.arange(1, 9).unsqueeze(0)
    name = "decoder.blocks.0.attn.hook_result"
    fired = []
    with pytest.raises(ValueError, match=r"set_use_attn_result\(True\)"):
        model.add_hook(name, lambda t, hook: fired.append(hook.name))
    with pytest.raises(ValueError, match=r"set_use_attn_result\(True\)"):
        model.run_with_hooks(x, x, fwd_hooks=[(lambda n: n.endswith("attn.hook_result"), lambda t, hook: None)])
    with pytest.raises(ValueError, match=r"set_use_attn_result\(True\)"):
        model.run_with_cache(x, x, names_filter=name)
    with pytest.raises(ValueError, match=r"set_use_expert_outputs\(True\)"):
        model.add_hook("decoder.blocks.0.moe.hook_expert_out", lambda t, hook: None)
    assert not model.has_hooks
    # Caching every hook leaves the switched-off points out rather than refusing.
    _, cache = model.run_with_cache(x, x)
    assert name not in cache and "decoder.blocks.0.attn.hook_z" in cache
    model.set_use_attn_result(True)
    model.run_with_hooks(x, x, fwd_hooks=[(name, lambda t, hook: fired.append(hook.name))])
    assert fired == [name]
