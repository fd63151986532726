"""Tests for diffusionlens.serial_depth: rules, longest path, boundaries, composition, the traced model."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

import diffusionlens.serial_depth.depth as depth_mod
from diffusionlens.cli import main as cli_main
from diffusionlens.serial_depth import (
    DepthReport,
    build_depth_table,
    clog2,
    compose_depths,
    depth_table,
    format_depth_table,
    interpretable,
    naive_ratio_at,
    report,
    serial_depth,
    steps_for_naive_ratio,
    table_step_counts,
)
from diffusionlens.serial_depth.passes import (
    DEFAULT_CONFIG,
    CausalLMPass,
    DecoderPass,
    build_depth_model,
    load_config,
)

META = torch.device("meta")


def tiny_text_config(num_experts: int = 4, layers: int = 2) -> dict:
    return {
        "hidden_size": 64,
        "num_hidden_layers": layers,
        "layer_types": ["sliding_attention"] * (layers - 1) + ["full_attention"],
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "per_layer_config": {str(layers - 1): {"head_dim": 32, "num_key_value_heads": 1}},
        "intermediate_size": 96,
        "num_experts": num_experts,
        "top_k_experts": 2,
        "moe_intermediate_size": 32,
        "vocab_size": 128,
        "sliding_window": 8,
        "rms_norm_eps": 1e-6,
        "final_logit_softcapping": 30.0,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
        },
    }


# --------------------------------------------------------------------------------------- reference example


def test_readme_mlp_depth_is_11():
    # serial_depth README / examples/mlp.py: Dense(8) relu Dense(8) relu Dense(1), use_bias=False, input (1,).
    mlp = nn.Sequential(
        nn.Linear(1, 8, bias=False), nn.ReLU(), nn.Linear(8, 8, bias=False), nn.ReLU(), nn.Linear(8, 1, bias=False)
    )
    res = serial_depth(mlp, torch.randn(1))
    assert res.depth == 11
    # 2 + 5 + 4, as the README derives it layer by layer.
    assert [s.cost for s in res.critical_path] == [1, 1, 4, 1, 4]
    assert res.per_module == {"0": 1, "1": 1, "2": 4, "3": 1, "4": 4}


def test_mlp_with_bias_adds_one_per_dense():
    mlp = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    assert serial_depth(mlp, torch.randn(1)).depth == 14


# The reference README's rule list, written as PyTorch: data movement 0; elementwise 1 each; reductions,
# dot_general and cumsum log N; scan = iterations x body depth; cond = max over branches; nested computations
# recursed into; the program's depth = max over outputs.


def test_readme_data_movement_is_0():
    assert serial_depth(lambda x: x.t().reshape(4, 6).permute(1, 0).flatten(), torch.empty(6, 4)).depth == 0


def test_readme_elementwise_add_mul_sin_are_1_each():
    assert serial_depth(lambda x, y: torch.sin(x * y + y), torch.empty(5), torch.empty(5)).depth == 3


@pytest.mark.parametrize(
    "fn,n,extra",
    [
        (lambda x: x.sum(), 1000, 0),  # reduce_sum
        (lambda x: torch.cumsum(x, 0), 1000, 0),  # cumsum
        (lambda x: torch.dot(x, x), 8, 1),  # dot_general: multiply, then log N adder tree
    ],
)
def test_readme_log_depth_primitives(fn, n, extra):
    assert serial_depth(fn, torch.empty(n)).depth == math.ceil(math.log2(n)) + extra


def test_readme_scan_is_iterations_times_body():
    # A Python loop unrolls into the ATen graph, which is what the reference's scan rule charges:
    # length x body depth. Body: x @ W with K = 16 (clog2(16) + 1 = 5) then tanh (1).
    def loop(x, w):
        for _ in range(5):
            x = torch.tanh(x @ w)
        return x

    assert serial_depth(loop, torch.empty(2, 16), torch.empty(16, 16)).depth == 5 * (clog2(16) + 1 + 1) == 30


def test_readme_cond_is_max_of_branches():
    # torch.cond does not trace on meta tensors here; the data-dependent choice of one of two computed
    # branches is torch.where (jax select_n, clog2(2) = 1 on top of the deeper branch).
    def choose(p, x):
        return torch.where(p > 0, x.exp().exp().exp(), x.neg())

    assert serial_depth(choose, torch.empty(3), torch.empty(3)).depth == max(3, 1) + 1
    # a Python `if` on a static value traces only the branch taken
    assert serial_depth(lambda x: x.exp().exp() if x.shape[0] > 2 else x, torch.empty(3)).depth == 2


def test_readme_nested_computations_are_inlined():
    flat = nn.Sequential(
        nn.Linear(1, 8, bias=False), nn.ReLU(), nn.Linear(8, 8, bias=False), nn.ReLU(), nn.Linear(8, 1, bias=False)
    )
    nested = nn.Sequential(nn.Sequential(flat[0], flat[1]), nn.Sequential(flat[2], nn.Sequential(flat[3], flat[4])))
    res = serial_depth(nested, torch.randn(1))
    assert res.depth == serial_depth(flat, torch.randn(1)).depth == 11
    assert res.per_module == {"0.0": 1, "0.1": 1, "1.0": 4, "1.1.0": 1, "1.1.1": 4}


def test_readme_final_depth_is_max_over_outputs():
    res = serial_depth(lambda x: (x.exp(), x.exp().exp().exp(), x.t()), torch.empty(2, 2))
    assert res.depth == 3
    assert res.output_depths == [1, 3, 0]


# --------------------------------------------------------------------------------------------- single ops


@pytest.mark.parametrize("k", [1, 2, 3, 1024, 1025])
def test_matmul_depth_for_several_k(k):
    # multiply (1) then an adder tree over K: clog2(K) + 1 -> 1, 2, 3, 11, 12
    expected = {1: 1, 2: 2, 3: 3, 1024: 11, 1025: 12}[k]
    assert serial_depth(lambda a, b: a @ b, torch.empty(4, k), torch.empty(k, 5)).depth == expected
    assert serial_depth(lambda a, b: torch.bmm(a, b), torch.empty(2, 4, k), torch.empty(2, k, 5)).depth == expected


@pytest.mark.parametrize(
    "fn,args,expected",
    [
        (lambda a, b: a @ b, (torch.empty(2, 1024), torch.empty(1024, 3)), 11),
        (lambda a, b: torch.bmm(a, b), (torch.empty(2, 4, 100), torch.empty(2, 100, 5)), 8),
        (lambda x: x.sum(-1), (torch.empty(5, 8),), 3),
        (lambda x: x.amax(dim=(0, 1)), (torch.empty(4, 8),), 5),
        (lambda x: x.mean(-1), (torch.empty(5, 8),), 4),
        (lambda x: x.argmax(-1), (torch.empty(5, 1000),), 10),
        (lambda x: x.exp().tanh().neg(), (torch.empty(7),), 3),
        (lambda x: x.reshape(2, 3).t().unsqueeze(0), (torch.empty(6),), 0),
        (lambda x: torch.cat([x, x])[1:4], (torch.empty(6),), 0),
        (lambda x: torch.topk(x, 5, dim=-1)[0], (torch.empty(3, 1000),), 10),
        (lambda x: torch.topk(x, 5, dim=-1)[1], (torch.empty(3, 1000),), 10),
        (lambda x: torch.cumsum(x, dim=0), (torch.empty(16, 3),), 4),
        (lambda x: torch.softmax(x, -1), (torch.empty(2, 16),), 2 * 4 + 3),
        (lambda x: nn.functional.gelu(x, approximate="tanh"), (torch.empty(3),), 8),
        (lambda x: nn.functional.layer_norm(x, (8,)), (torch.empty(2, 8),), 2 * 4 + 5),
        (lambda e, i: nn.functional.embedding(i, e), (torch.empty(10, 4), torch.zeros(3, dtype=torch.long)), 0),
        (lambda x: x.float().to(torch.bfloat16), (torch.empty(3),), 0),
        (lambda x: torch.where(x > 0, x, 0.0), (torch.empty(3),), 2),
        (lambda x: torch.zeros_like(x.exp()) + 1, (torch.empty(3),), 1),
    ],
)
def test_single_op_rules(fn, args, expected):
    assert serial_depth(fn, *args).depth == expected


def test_clog2():
    assert [clog2(n) for n in (1, 2, 3, 4, 5, 8, 9, 1024, 1025)] == [0, 1, 2, 2, 3, 3, 4, 10, 11]


def test_inplace_ops_are_functionalised():
    def f(x):
        y = x.exp()
        y.mul_(2)  # the mutation must count for later readers of y
        return y + 1

    assert serial_depth(f, torch.empty(3)).depth == 3


# ------------------------------------------------------------------------------------------- longest path


def test_longest_path_picks_deeper_branch_of_diamond():
    def diamond(x, w):
        shallow = x.exp().exp().exp()  # 3
        deep = x @ w  # K = 1024 -> 11
        return shallow + deep  # 12

    res = serial_depth(diamond, torch.empty(1024, 1024), torch.empty(1024, 1024))
    assert res.depth == 12
    assert [s.op for s in res.critical_path] == ["aten.mm", "aten.add"]
    assert res.per_op["aten.mm"].depth == 11
    assert res.per_op_all["aten.exp"].count == 3


def test_dead_code_does_not_count():
    def f(x):
        _ = x.exp().exp().exp().exp()
        return x.neg()

    assert serial_depth(f, torch.empty(3)).depth == 1


def test_sources_restrict_chain_starts():
    def f(a, b, w):
        return a.exp() + b @ w

    args = (torch.empty(4, 4), torch.empty(4, 1024), torch.empty(1024, 4))
    assert serial_depth(f, *args).depth == 12
    assert serial_depth(f, *args, sources=[0]).depth == 2
    assert serial_depth(f, *args, sources=[1]).depth == 12


def test_unknown_op_warns_and_is_listed(monkeypatch):
    monkeypatch.setattr(depth_mod, "_WARNED", set())
    with pytest.warns(UserWarning, match="aten.lgamma"):
        res = serial_depth(lambda x: torch.lgamma(x).exp(), torch.empty(3))
    assert "aten.lgamma" in res.unknown_ops
    assert res.depth == 1  # unknown ops are charged 0, like the reference's unsupported primitives


def test_interpretable_boundary_resets_chain():
    def no_boundary(x):
        return x.exp().exp().exp().exp().exp()

    def with_boundary(x):
        return interpretable(x.exp().exp()).exp().exp().exp()

    assert serial_depth(no_boundary, torch.empty(3)).depth == 5
    assert serial_depth(with_boundary, torch.empty(3)).depth == 3
    # the chain into the boundary counts even when it is the longer one
    assert serial_depth(lambda x: interpretable(x.exp().exp().exp().exp()).exp(), torch.empty(3)).depth == 4
    # eager use stays an identity
    x = torch.randn(3)
    assert torch.equal(interpretable(x), x)


def test_real_weights_are_traced_on_meta():
    lin = nn.Linear(256, 4)
    res = serial_depth(lin, torch.randn(2, 256))
    assert res.depth == 8 + 1 + 1
    assert not lin.weight.is_meta  # the user's module is untouched


# ---------------------------------------------------------------------------------------------- composition


def test_compose_depths_arithmetic():
    g = compose_depths(step_depth=100, sc_depth=90, ar_depth=80, steps=4, canvases=3, readout_depth=10)
    assert g.naive == 100 + 3 * (1 + 90) + 10
    assert g.per_canvas_naive == g.naive  # canvases reset at committed tokens
    assert g.bottleneck == 110
    assert g.ar == 90
    assert g.naive_ratio == pytest.approx(383 / 90)
    assert g.bottleneck_ratio == pytest.approx(110 / 90)
    carried = compose_depths(100, 90, 80, steps=4, canvases=3, readout_depth=10, carry_sc_across_canvases=True)
    assert carried.naive == 100 + 11 * 91 + 10
    one = compose_depths(100, 90, 80, steps=1, link_depth=0)
    assert one.naive == one.bottleneck == 100
    with pytest.raises(ValueError):
        compose_depths(1, 1, 1, steps=0)


# ---------------------------------------------------------------------------- the traced model (real stacks)


def test_shipped_26b_config_loads():
    raw = json.loads(DEFAULT_CONFIG.read_text())
    assert raw["canvas_length"] == 256
    cfg = load_config()
    assert cfg.canvas_length == 256
    assert cfg.hidden_size == 2816 and cfg.num_hidden_layers == 30
    full = [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"]
    assert full == [5, 11, 17, 23, 29]
    assert (cfg.layer_head_dim(5), cfg.layer_kv_heads(5)) == (512, 2)
    assert (cfg.layer_head_dim(4), cfg.layer_kv_heads(4)) == (256, 8)
    assert (cfg.num_experts, cfg.top_k_experts, cfg.moe_intermediate_size) == (128, 8, 704)
    assert cfg.vocab_size == 262144 and cfg.sliding_window == 1024
    assert cfg.global_partial_rotary_factor == 0.25


def test_26b_dims_one_layer_matches_hand_count():
    # One sliding layer alone: a layout transformers would not keep (it forces the last layer to full), so it
    # is built in memory from the real config rather than read from a config.json.
    one_sliding = load_config(DEFAULT_CONFIG).replace(num_hidden_layers=1, layer_types=("sliding_attention",))
    seq = 1280
    model = build_depth_model(one_sliding)
    res = serial_depth(CausalLMPass(model), torch.empty(1, seq, dtype=torch.long, device=META))
    norm = 1 + (clog2(2816) + 1) + 1 + 1 + 1 + 1  # pow, mean, add, pow(-1/2), mul, weight
    attn = norm + 13 + 14 + 3 + 9 + 1 + 1 + (2 * clog2(seq) + 3) + (clog2(seq) + 1) + 13 + norm + 1
    router = (norm - 1) + 2 + 13 + (2 * 7 + 3) + 7  # unscaled norm, scale, proj, softmax, top-k
    experts = 13 + 8 + 1 + (clog2(704) + 1) + 1 + 3  # gathered gate/up, gelu, *up, down, *w, sum over k
    ffn = router + experts + norm + 1 + norm + 1 + 1  # post-norm 2, add, post-norm, residual, scalar
    head = norm + 13 + 3  # final norm, tied LM head, soft-cap
    assert res.depth == 1 + attn + ffn + head
    assert not res.unknown_ops


def test_moe_depth_grows_only_by_router_log_terms():
    def depth(experts: int) -> int:
        model = build_depth_model(load_config(tiny_text_config(num_experts=experts, layers=2)))
        ids = torch.empty(1, 12, dtype=torch.long, device=META)
        return serial_depth(CausalLMPass(model), ids).depth

    d4, d128 = depth(4), depth(128)
    # per layer: softmax over E (2 log2 E) and top-k over E (log2 E) are the only E-dependent terms.
    assert d128 - d4 == 2 * 3 * (clog2(128) - clog2(4))


def test_tiny_decoder_pass_traces_and_report_composes():
    cfg = load_config(tiny_text_config())
    model = build_depth_model(cfg)
    past = [
        (torch.empty(1, kv, 10, hd, device=META), torch.empty(1, kv, 10, hd, device=META))
        for hd, kv in ((cfg.layer_head_dim(i), cfg.layer_kv_heads(i)) for i in range(cfg.num_hidden_layers))
    ]
    canvas = torch.empty(1, 6, dtype=torch.long, device=META)
    sc = torch.empty(1, 6, cfg.vocab_size, device=META)
    res = serial_depth(DecoderPass(model), canvas, sc, past)
    from_sc = serial_depth(DecoderPass(model), canvas, sc, past, sources=[1])
    assert res.depth >= from_sc.depth > 0
    assert not res.unknown_ops
    # the router is the real model's MoE module (was the deleted reference stack's `stack.layers.1.router`)
    assert any(m.startswith("model.decoder.blocks.1.moe") for m in res.per_module)

    rep = report({"text_config": tiny_text_config(), "canvas_length": 6}, prompt_len=10, steps=5, readout_k=4)
    g = rep.generation
    assert rep.step >= rep.decoder >= rep.decoder_from_sc > 0
    assert rep.encoder > 0 and rep.ar > 0
    assert g.naive == rep.step + 4 * (1 + rep.decoder_from_sc) + rep.readout
    assert g.bottleneck == rep.step + rep.readout
    assert rep.readout == 1 + clog2(128) + 2 * clog2(4) + 3
    assert "naive" in str(rep)


def test_real_config_traces_on_meta_within_4_gib():
    # In a fresh interpreter, so that other tests' allocations do not count: trace the shipped 26B-A4B
    # decoder pass (canvas 256, full vocabulary, a 1024-token KV cache) on meta tensors.
    code = """
import torch
from pathlib import Path
from diffusionlens.serial_depth import serial_depth
from diffusionlens.serial_depth.passes import DecoderPass, build_depth_model, load_config
def peak_kib():
    # VmHWM is this process's own peak; ru_maxrss would inherit the pytest parent's peak through exec
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("VmHWM:")).split()[1])
before = peak_kib()
cfg = load_config()
meta = torch.device("meta")
past = [(torch.empty(1, kv, 1024, hd, device=meta), torch.empty(1, kv, 1024, hd, device=meta))
        for hd, kv in ((cfg.layer_head_dim(i), cfg.layer_kv_heads(i)) for i in range(cfg.num_hidden_layers))]
res = serial_depth(
    DecoderPass(build_depth_model(cfg)),
    torch.empty(1, cfg.canvas_length, dtype=torch.long, device=meta),
    torch.empty(1, cfg.canvas_length, cfg.vocab_size, device=meta),
    past,
    sources=[0, 1],
)
after = peak_kib()
print(before, after, res.depth, len(res.unknown_ops))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600)
    before_kib, after_kib, depth, n_unknown = (int(v) for v in out.stdout.split())
    assert after_kib - before_kib < 4 * 1024 * 1024  # VmHWM is in KiB
    assert after_kib < 4 * 1024 * 1024  # the whole process, torch included
    assert n_unknown == 0
    assert depth == 7979  # docs/serial_depth.md: decoder pass from canvas tokens + sc input, prompt 1024


# ---------------------------------------------------------------------------------------- the depth table


def fake_report(encoder=7515, decoder=7979, from_sc=7979, step=7979, ar=7850, readout=34, steps=48) -> DepthReport:
    gen = compose_depths(step, from_sc, ar, steps, readout_depth=readout)
    settings = {"config": "fake", "prompt_len": 1024, "canvas_length": 256, "steps": steps, "readout_k": 64}
    return DepthReport(encoder, decoder, from_sc, step, ar, readout, gen, settings)


def test_table_step_counts():
    assert table_step_counts(48) == [1, 2, 4, 8, 16, 32, 48]
    assert table_step_counts(10) == [1, 2, 4, 8, 10]
    assert table_step_counts(1) == [1]
    assert table_step_counts(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    with pytest.raises(ValueError):
        table_step_counts(0)


def test_steps_for_naive_ratio_arithmetic():
    # D_step + (S-1)(1 + D_sc) + R = ratio * (D_ar + R)
    # 100 + (S-1) * 91 + 10 = 28.6 * 90 = 2574  ->  S = 1 + 2464 / 91
    s = steps_for_naive_ratio(28.6, step_depth=100, sc_depth=90, ar_total=90, readout_depth=10)
    assert s == pytest.approx(1 + 2464 / 91)
    assert math.ceil(s) == 29
    below = compose_depths(100, 90, 80, steps=28, readout_depth=10)
    above = compose_depths(100, 90, 80, steps=29, readout_depth=10)
    assert below.naive_ratio < 28.6 <= above.naive_ratio
    assert naive_ratio_at(s, 100, 90, 90, 10) == pytest.approx(28.6)
    # exact when the solution is whole (no float round-off pushing ceil one step up)
    assert steps_for_naive_ratio(3.0, step_depth=10, sc_depth=9, ar_total=10, readout_depth=0) == 3.0
    assert steps_for_naive_ratio(28.6, step_depth=10, sc_depth=9, ar_total=10, readout_depth=0) == 28.6
    assert steps_for_naive_ratio(2.0, step_depth=30, sc_depth=9, ar_total=10, readout_depth=0) == 1.0
    assert steps_for_naive_ratio(28.6, 10, sc_depth=0, ar_total=10, readout_depth=0, link_depth=0) == math.inf
    # the 26B numbers in docs/serial_depth.md: S = 28 gives 28.35x, S = 29 gives 29.36x
    s26 = steps_for_naive_ratio(28.6, step_depth=7979, sc_depth=7979, ar_total=7884, readout_depth=34)
    assert s26 == pytest.approx(1 + (28.6 * 7884 - 8013) / 7980)
    assert 28 < s26 < 29
    assert naive_ratio_at(28, 7979, 7979, 7884, 34) == pytest.approx(28.345, abs=1e-3)


def test_build_depth_table_rows_and_format():
    rep = fake_report()
    table = build_depth_table(rep)
    labels = [r.label for r in table.rows]
    assert labels[0].startswith("AR Gemma 4") and "decoder pass" in labels[1] and "bottleneck" in labels[-1]
    ar, dec, *naive, bottleneck = table.rows
    assert (ar.depth, ar.ratio) == (7884, 1.0)
    assert dec.depth == 7979 + 34
    assert [r.steps for r in naive] == [1, 2, 4, 8, 16, 32, 48]
    for r in naive:
        g = compose_depths(7979, 7979, 7850, r.steps, readout_depth=34)
        assert r.depth == g.naive and r.ratio == pytest.approx(g.naive_ratio)
    assert naive[-1].depth == rep.generation.naive == 383073
    assert bottleneck.depth == 8013 and bottleneck.steps is None
    assert table.whole_steps_to_paper == 29 and 28 < table.steps_to_paper < 29
    text = format_depth_table(table)
    assert "not given" in text and "28.6x" in text and "383073" in text and "48.59x" in text

    toy = build_depth_table(rep, steps=10, toy_mean_steps=7.5)
    assert [r.steps for r in toy.rows[2:-1]] == [1, 2, 4, 8, 10]
    assert toy.toy_ratio == pytest.approx(naive_ratio_at(7.5, 7979, 7979, 7884, 34))
    assert "toy model mean denoising steps: 7.5" in format_depth_table(toy)


def test_depth_table_on_tiny_config():
    cfg = {"text_config": tiny_text_config(), "canvas_length": 6}
    table = depth_table(cfg, steps=5, prompt_len=10)
    rep = table.report
    assert table.rows[0].depth == rep.ar + rep.readout and table.rows[0].ratio == 1.0
    naive = {r.steps: r.depth for r in table.rows if r.steps is not None}
    assert naive == {s: rep.step + (s - 1) * (1 + rep.decoder_from_sc) + rep.readout for s in (1, 2, 4, 5)}
    assert naive[5] == rep.generation.naive
    assert table.rows[-1].depth == rep.generation.bottleneck


def test_cli_depth(tmp_path, capsys):
    cli_main(["--help"])
    assert "diffusionlens depth" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        cli_main(["depth", "--help"])
    assert exc.value.code == 0
    assert "--toy-mean-steps" in capsys.readouterr().out

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"text_config": tiny_text_config(), "canvas_length": 6}))
    cli_main(["depth", "--config", str(path), "--steps", "3", "--prompt-len", "10", "--toy-mean-steps", "2.5"])
    out = capsys.readouterr().out
    assert "naive self-conditioning" in out and "token bottleneck" in out
    assert "toy model mean denoising steps: 2.5" in out and "28.6x" in out
    assert [ln.split()[-3] for ln in out.splitlines() if "naive self-conditioning" in ln] == ["1", "2", "3"]
