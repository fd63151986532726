"""TransformerLens-shaped weights reproduce the model's computation, block by block, in float64."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from diffusionlens import DiffusionGemmaConfig, HookedDiffusionGemma
from diffusionlens.components import moe as moe_module
from diffusionlens.components import norms as norms_module
from diffusionlens.components.mlp import activation
from diffusionlens.components.rope import apply_rotary
from diffusionlens.weights.tl_weights import block_weights, model_weights

TOL = dict(atol=1e-10, rtol=1e-10)

# Sliding and full layers, 2 query heads per KV head on sliding layers and 4 on full ones, attention
# biases on, so every reshaping and grouping shows.
CFG = DiffusionGemmaConfig(
    vocab_size=53,
    hidden_size=24,
    intermediate_size=20,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=6,
    global_head_dim=10,
    num_global_key_value_heads=1,
    sliding_window=4,
    layer_types=("sliding_attention", "full_attention"),
    num_experts=3,
    top_k_experts=2,
    moe_intermediate_size=7,
    attention_bias=True,
    canvas_length=5,
    max_position_embeddings=64,
)


@pytest.fixture(scope="module")
def setup():
    model = HookedDiffusionGemma.from_config(CFG, dtype=torch.float64)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        # Randomise everything, norms and scalars around 1 with real spread, so a skipped or swapped
        # norm, a wrong head grouping or a swapped gate/up half shows. Encoder and decoder share every
        # parameter; their layer_scalar buffers are drawn separately.
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith(("embed_scale", "inv_freq")):
                continue
            noise = torch.randn(tensor.shape, generator=g, dtype=torch.float64)
            scale_like = "norm" in name or ".ln" in name or "scale" in name or "layer_scalar" in name
            value = 1.0 + 0.3 * noise if scale_like else 0.3 * noise
            # RMSNorm multiplies by `weight.float()`: gains exactly representable in fp32 stay exact.
            tensor.copy_(value.float().double() if scale_like else value)
    ids = torch.randint(3, CFG.vocab_size, (2, 7), generator=g)
    canvas = torch.randint(0, CFG.vocab_size, (2, 5), generator=g)
    # torch's grouped_mm has no float64 kernel; the per-expert loop fallback computes the same thing.
    # RMSNorm computes in fp32 by design (as the reference), which would cap every comparison past a norm
    # at ~1e-7; a float64 norm lets the weights be checked to 1e-10 through the whole block.
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(moe_module, "_grouped_mm_available", lambda weight: False)
        patch.setattr(norms_module, "COMPUTE_DTYPE", torch.float64)  # rms_normalize and RMSNorm both use it
        logits, cache = model.run_with_cache(ids, canvas)
    return SimpleNamespace(model=model, ids=ids, canvas=canvas, logits=logits, cache=cache)


def rms_normalize64(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.pow(x.pow(2).mean(-1, keepdim=True) + eps, -0.5)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, **TOL)


def rms_norm(x: torch.Tensor, gain: torch.Tensor | None = None) -> torch.Tensor:
    out = rms_normalize64(x, 1e-6)
    return out if gain is None else out * gain


@pytest.mark.parametrize("layer", [0, 1])
def test_shapes_and_grouping(setup, layer):
    cfg = setup.model.cfg
    bw = block_weights(setup.model, layer)
    d_head, n_kv = cfg.layer_head_dim(layer), cfg.layer_kv_heads(layer)
    d, heads = cfg.d_model, cfg.n_heads
    assert bw.W_Q.shape == bw.W_K.shape == bw.W_V.shape == (heads, d, d_head)
    assert bw._W_K.shape == bw._W_V.shape == (n_kv, d, d_head)
    assert bw.W_O.shape == (heads, d_head, d)
    assert bw.W_in.shape == bw.W_gate.shape == (d, cfg.d_mlp)
    assert bw.W_out.shape == (cfg.d_mlp, d)
    assert bw.W_in_experts.shape == bw.W_gate_experts.shape == (3, d, 7)
    assert bw.W_out_experts.shape == (3, 7, d)
    assert bw.W_router.shape == (d, 3)
    assert bw.QK.shape == bw.OV.shape == (heads, d, d) and bw.QK.mdim == d_head
    for h in range(heads):  # query head h reads KV head h // group, as transformers' repeat_kv
        close(bw.W_K[h], bw._W_K[h // (heads // n_kv)])
        close(bw.b_V[h], bw._b_V[h // (heads // n_kv)])
    assert (bw._W_V is bw._W_K) == (not bw.sliding)  # full layers: k = v
    close(bw.QK.AB, bw.W_Q @ bw.W_K.transpose(-2, -1))
    close(bw.OV.AB, bw.W_V @ bw.W_O)
    close(bw.QK[2].AB, bw.W_Q[2] @ bw.W_K[2].T)


@pytest.mark.parametrize("layer", [0, 1])
def test_attention_reproduced_from_weights(setup, layer):
    """Per head: q/k/v from W_Q/W_K/W_V (expanded) through the norms match the hooks; the whole attention
    (RoPE, causal softmax, W_O summed over heads) matches the module's output."""
    model, cfg = setup.model, setup.model.cfg
    bw = block_weights(model, layer, stack="encoder")
    attn = model.encoder.blocks[layer].attn
    x = setup.cache[f"encoder.blocks.{layer}.ln1.hook_normalized"]
    cached = {n: setup.cache[f"encoder.blocks.{layer}.attn.hook_{n}"] for n in ("q", "k", "v", "z")}
    group = bw.group_size
    q = torch.einsum("bpd,hde->bphe", x, bw.W_Q) + bw.b_Q
    k = torch.einsum("bpd,hde->bphe", x, bw.W_K) + bw.b_K
    v = torch.einsum("bpd,hde->bphe", x, bw.W_V) + bw.b_V
    q, k, v = rms_norm(q, bw.q_norm_gain), rms_norm(k, bw.k_norm_gain), rms_norm(v)
    close(q, cached["q"])
    close(k, cached["k"].repeat_interleave(group, dim=2))
    close(v, cached["v"].repeat_interleave(group, dim=2))

    positions = torch.arange(x.shape[1])[None]
    cos, sin = model.encoder.rotary(positions, cfg.layer_types[layer], x.dtype)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    scores = torch.einsum("bqhe,bkhe->bhqk", q, k)  # the softmax scale is 1: q and k are normalised
    n = x.shape[1]
    offset = torch.arange(n)[:, None] - torch.arange(n)[None, :]  # query - key
    allowed = (offset >= 0) & ((offset < cfg.sliding_window) if bw.sliding else True)
    scores = scores.masked_fill(~allowed, float("-inf"))
    z = torch.einsum("bhqk,bkhe->bqhe", scores.softmax(-1), v)
    close(z, cached["z"])
    out = torch.einsum("bqhe,hed->bqd", z, bw.W_O) + bw.b_O
    with torch.no_grad():
        close(out, attn.o_proj(cached["z"].flatten(-2)))
    close(rms_norm(out, bw.norm_gains["ln1_post"]), setup.cache[f"encoder.blocks.{layer}.hook_attn_out"])


@pytest.mark.parametrize("layer", [0, 1])
def test_dense_mlp_and_experts_reproduced(setup, layer):
    model, cache = setup.model, setup.cache
    bw = block_weights(model, layer)  # decoder
    prefix = f"decoder.blocks.{layer}"
    act = activation(model.cfg.hidden_activation)
    resid = cache[f"{prefix}.hook_resid_mid"]

    x = rms_norm(resid, bw.norm_gains["ln2"])
    pre = x @ bw.W_gate
    close(pre, cache[f"{prefix}.mlp.hook_pre"])
    mlp = (act(pre) * (x @ bw.W_in)) @ bw.W_out
    close(rms_norm(mlp, bw.norm_gains["ln2_post_mlp"]), cache[f"{prefix}.hook_mlp_out"])

    router_in = rms_norm(resid) * bw.router_scale * model.cfg.d_model**-0.5
    close(router_in @ bw.W_router, cache[f"{prefix}.moe.hook_router_logits"])
    x_moe = rms_norm(resid, bw.norm_gains["ln2_moe"])
    expert_out = torch.stack(
        [(act(x_moe @ bw.W_gate_experts[e]) * (x_moe @ bw.W_in_experts[e])) @ bw.W_out_experts[e] for e in range(3)],
        dim=-2,
    )  # [batch, pos, expert, d_model]
    weights, indices = cache[f"{prefix}.moe.hook_expert_weights"], cache[f"{prefix}.moe.hook_expert_indices"]
    picked = torch.gather(expert_out, 2, indices[..., None].expand(-1, -1, -1, expert_out.shape[-1]))
    moe = (weights[..., None] * picked).sum(2)
    close(rms_norm(moe, bw.norm_gains["ln2_post_moe"]), cache[f"{prefix}.hook_moe_out"])
    # per_expert_scale is not folded: it is inside the routed weights.
    probs = torch.softmax(cache[f"{prefix}.moe.hook_router_logits"], -1).gather(-1, indices)
    # (The router's softmax runs in fp32 by design, hence the looser tolerance.)
    torch.testing.assert_close(weights, probs / probs.sum(-1, keepdim=True) * bw.per_expert_scale[indices])


@pytest.mark.parametrize("layer", [0, 1])
def test_folding_is_exact(setup, layer):
    """Folded matrices read the scale-free RMS-normalised residual and give the same products."""
    model = setup.model
    raw, folded = block_weights(model, layer), block_weights(model, layer, fold_norm_gains=True)
    assert folded.folded and not raw.folded
    resid = setup.cache[f"decoder.blocks.{layer}.hook_resid_pre"]
    hat = rms_norm(resid)
    pairs = [
        ("W_Q", "ln1"),
        ("W_K", "ln1"),
        ("W_V", "ln1"),
        ("W_in", "ln2"),
        ("W_gate", "ln2"),
        ("W_in_experts", "ln2_moe"),
        ("W_gate_experts", "ln2_moe"),
    ]
    for name, norm in pairs:
        with_gain = rms_norm(resid, raw.norm_gains[norm])
        lhs = hat.unsqueeze(-3) @ getattr(folded, name) if getattr(raw, name).ndim == 3 else hat @ getattr(folded, name)
        rhs = (
            with_gain.unsqueeze(-3) @ getattr(raw, name)
            if getattr(raw, name).ndim == 3
            else with_gain @ getattr(raw, name)
        )
        close(lhs, rhs)
    close(hat @ folded.W_router, hat * raw.router_scale * model.cfg.d_model**-0.5 @ raw.W_router)
    for name in ("W_O", "W_out", "W_out_experts", "q_norm_gain", "k_norm_gain", "per_expert_scale"):
        assert torch.equal(getattr(folded, name), getattr(raw, name)), f"{name} must not change when folding"
    assert (folded._W_V is folded._W_K) == (not folded.sliding)


def test_embed_unembed_and_folded_ln_final(setup):
    model, cache = setup.model, setup.cache
    for fold in (False, True):
        mw = model_weights(model, fold_norm_gains=fold)
        assert mw.W_E.shape == (53, 24) and mw.W_U.shape == (24, 53) and len(mw.blocks) == 2
        close(mw.W_E[setup.ids] * mw.embed_scale, cache["encoder.hook_embed"])
        resid = cache["decoder.blocks.1.hook_resid_post"]
        x = rms_norm(resid) if fold else rms_norm(resid, mw.ln_final_gain)
        logits = mw.softcap * torch.tanh(x @ mw.W_U / mw.softcap)
        torch.testing.assert_close(logits.float(), setup.logits)  # the LM head returns fp32 logits by design
    assert torch.equal(model_weights(model).W_U, model_weights(model).W_E.T)


def test_stacks_differ_only_in_layer_scalar(setup):
    model = setup.model
    enc, dec = block_weights(model, 1, "encoder"), block_weights(model, 1, "decoder")
    assert enc.layer_scalar == float(model.encoder.blocks[1].layer_scalar)
    assert dec.layer_scalar == float(model.decoder.blocks[1].layer_scalar) != enc.layer_scalar
    assert torch.equal(enc.W_Q, dec.W_Q) and torch.equal(enc.W_router, dec.W_router)
    assert model_weights(model, "encoder").blocks[1].layer_scalar == enc.layer_scalar
    assert block_weights(model, -1).layer == 1


def test_qk_with_norm_gains_is_the_unrotated_score(setup):
    """Before RoPE, q·k is x̂ QK_with_norm_gains ŷᵀ (plus bias terms) over rms(x̂ W_Q) rms(ŷ W_K)."""
    model = setup.model
    bw = block_weights(model, 1)
    x = setup.cache["decoder.blocks.1.ln1.hook_normalized"][0]  # [pos, d_model]
    k_hook = setup.cache["decoder.blocks.1.attn.hook_k"][0]
    q_hook = setup.cache["decoder.blocks.1.attn.hook_q"][0]
    h = 3
    q_raw, k_raw = x @ bw.W_Q[h] + bw.b_Q[h], x @ bw.W_K[h] + bw.b_K[h]
    rms = lambda t: t.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()  # noqa: E731
    dense = q_hook[:, h] @ k_hook[:, h // bw.group_size].T
    # With biases, the bilinear part is QK_with_norm_gains applied to [x̂, 1]: check without the bias terms
    # by comparing to the product of the bias-free projections.
    qb, kb = q_raw - bw.b_Q[h], k_raw - bw.b_K[h]
    expected = (qb * bw.q_norm_gain) @ (kb * bw.k_norm_gain).T
    close(x @ bw.QK_with_norm_gains[h].AB @ x.T, expected)
    # And the dense score is that (with biases) over rms(q_raw) rms(k_raw).
    full = (q_raw * bw.q_norm_gain) @ (k_raw * bw.k_norm_gain).T / (rms(q_raw) * rms(k_raw).T)
    close(dense, full)


def test_bad_layer_and_stack_messages(setup):
    with pytest.raises(ValueError, match=r"layer=2 is out of range: a block index is 0\.\.1 \(2 layers\), or -2\.\.-1"):
        block_weights(setup.model, 2)
    with pytest.raises(ValueError, match="stack must be one of 'encoder', 'decoder', got 'decodr'"):
        block_weights(setup.model, 0, stack="decodr")
    with pytest.raises(ValueError, match="stack must be one of"):
        model_weights(setup.model, stack="both")
    with pytest.raises(TypeError, match="layer must be an int"):
        block_weights(setup.model, 1.0)


def test_docs_snippet_runs(capsys):
    page = (Path(__file__).parents[2] / "docs" / "weights.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", page, flags=re.S).group(1)
    exec(compile(snippet, "weights.md", "exec"), {})
    out = capsys.readouterr().out
    assert "torch.Size([4, 192, 96]) torch.Size([1, 192, 96]) torch.Size([4, 192, 96]) True" in out
    assert "torch.Size([4, 44, 44])" in out


# ---------------------------------------------------------------------- model.W_Q …: TransformerLens's stacked weights
def test_model_level_weights_stack_where_layers_agree():
    """`model.W_Q` … `model.W_U` as TransformerLens stacks them, read from the same blocks as block_weights."""
    cfg = DiffusionGemmaConfig(**{**CFG.__dict__, "global_head_dim": CFG.head_dim})
    model = HookedDiffusionGemma.from_config(cfg, dtype=torch.float64)
    blocks = model_weights(model).blocks
    for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "W_in", "W_gate", "W_out"):
        stacked = getattr(model, name)
        assert torch.equal(stacked, torch.stack([getattr(b, name) for b in blocks])), name
    assert model.W_Q.shape == (2, cfg.num_attention_heads, cfg.hidden_size, cfg.head_dim)
    assert model.W_K.shape == model.W_Q.shape  # one per query head, as TransformerLens's grouped attention
    assert torch.equal(model.b_in, torch.zeros(2, cfg.intermediate_size, dtype=torch.float64))
    assert torch.equal(model.b_out, torch.zeros(2, cfg.hidden_size, dtype=torch.float64))
    assert torch.equal(model.W_E, model.decoder.embed.W_E.detach()) and torch.equal(model.W_U, model.W_E.T)
    assert torch.equal(model.b_U, torch.zeros(cfg.vocab_size, dtype=torch.float64))
    no_bias = HookedDiffusionGemma.from_config(DiffusionGemmaConfig(**{**cfg.__dict__, "attention_bias": False}))
    assert torch.equal(no_bias.b_Q, torch.zeros(2, cfg.num_attention_heads, cfg.head_dim))
    assert torch.equal(no_bias.b_O, torch.zeros(2, cfg.hidden_size))
    for layer, block in enumerate(blocks):
        torch.testing.assert_close(model.QK[layer].AB, block.QK.AB, **TOL)
        torch.testing.assert_close(model.OV[layer].AB, block.OV.AB, **TOL)


def test_model_level_weights_where_head_sizes_differ(setup):
    """Sliding (d_head 6) and full (d_head 10) layers: head-sized weights refuse to stack, naming the per-layer
    form; QK / OV stack with the inner dimension zero-padded, which leaves every product as it is."""
    model = setup.model
    for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V"):
        with pytest.raises(ValueError, match=rf"model\.{name} cannot stack.*block_weights\(model, layer\)\.{name}"):
            getattr(model, name)
    assert model.b_O.shape == (2, CFG.hidden_size)  # no head axis: it stacks
    for layer in range(CFG.num_hidden_layers):
        block = block_weights(model, layer)
        torch.testing.assert_close(model.QK[layer].AB, block.QK.AB, **TOL)
        torch.testing.assert_close(model.OV[layer].AB, block.OV.AB, **TOL)
    assert model.QK.AB.shape == (2, CFG.num_attention_heads, CFG.hidden_size, CFG.hidden_size)
