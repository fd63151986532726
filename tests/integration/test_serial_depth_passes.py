"""serial_depth traces the model users run: the switches it flips compute the same numbers, the passes are the
real stacks, and a change to a real component shows up in the measured depth."""

from __future__ import annotations

import json

import pytest
import torch

from diffusionlens import HookedDiffusionGemma
from diffusionlens.components.attention import Attention
from diffusionlens.components.moe import MoE
from diffusionlens.components.stacks import Stack
from diffusionlens.config import DiffusionGemmaConfig
from diffusionlens.serial_depth import serial_depth
from diffusionlens.serial_depth.passes import CausalLMPass, DiffusionStepPass, build_depth_model, load_config
from diffusionlens.serial_depth.trace import MODULE_META_KEY, trace

META = torch.device("meta")


def tiny_config(**changes) -> DiffusionGemmaConfig:
    base = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        global_head_dim=16,
        num_global_key_value_heads=1,
        sliding_window=4,
        num_experts=6,
        top_k_experts=2,
        moe_intermediate_size=16,
        canvas_length=5,
    )
    return DiffusionGemmaConfig(**{**base, **changes})


def set_switches(model: HookedDiffusionGemma, on: bool) -> None:
    for module in model.modules():
        if isinstance(module, Stack):
            module.explicit_masks = on
        elif isinstance(module, MoE):
            module.gather_experts = on


@pytest.fixture(scope="module")
def model() -> HookedDiffusionGemma:
    return HookedDiffusionGemma.from_config(tiny_config(), seed=3).float().eval()


def test_gathered_experts_match_grouped_experts(model):
    moe = model.decoder.blocks[1].moe
    gen = torch.Generator().manual_seed(0)
    resid, expert_input = torch.randn(2, 7, 32, generator=gen), torch.randn(2, 7, 32, generator=gen)
    with torch.no_grad():
        grouped = moe(resid, expert_input)
        moe.gather_experts = True
        try:
            gathered = moe(resid, expert_input)
        finally:
            moe.gather_experts = False
    assert grouped.abs().max() > 1e-3  # not a comparison of zeros
    torch.testing.assert_close(gathered, grouped, atol=1e-5, rtol=1e-5)


def test_depth_switches_give_the_same_logits_as_the_default_paths(model):
    # explicit masks in every layer + gathered experts: what serial_depth traces, on real weights.
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 64, (2, 9), generator=gen)  # longer than the sliding window: sliding masks bite
    canvas = torch.randint(0, 64, (2, 5), generator=gen)
    sc_logits = torch.randn(2, 5, 64, generator=gen)
    with torch.no_grad():
        default = model.denoise(canvas, model.encode(prompt), sc_logits)
        set_switches(model, True)
        try:
            switched = model.denoise(canvas, model.encode(prompt), sc_logits)
            step_pass = DiffusionStepPass(model)(prompt, canvas, sc_logits)
        finally:
            set_switches(model, False)
    torch.testing.assert_close(switched, default, atol=1e-5, rtol=1e-5)
    # the traced pass is the user-facing encode -> denoise, not a re-implementation of it
    torch.testing.assert_close(step_pass, switched, atol=0, rtol=0)


def test_traced_modules_are_the_real_model_module_paths():
    # Every traced op is labelled with the module that ran it: the real model's own module paths.
    graph = trace(DiffusionStepPass(build_depth_model(tiny_config())), *step_inputs(tiny_config()))
    labels = {node.meta.get(MODULE_META_KEY) for node in graph.graph_module.graph.nodes if node.op == "call_function"}
    real_paths = {f"model.{name}" for name, _ in HookedDiffusionGemma(tiny_config()).named_modules() if name}
    assert labels <= real_paths | {"model", "DiffusionStepPass"}
    for path in ("model.encoder.blocks.0.attn", "model.decoder.blocks.2.moe", "model.decoder.self_cond.mlp"):
        assert any(label.startswith(path) for label in labels), path
    res = serial_depth(DiffusionStepPass(build_depth_model(tiny_config())), *step_inputs(tiny_config()))
    assert set(res.per_module) <= real_paths and not res.unknown_ops


def step_inputs(cfg: DiffusionGemmaConfig) -> tuple[torch.Tensor, ...]:
    return (
        torch.empty(1, 7, dtype=torch.long, device=META),
        torch.empty(1, cfg.canvas_length, dtype=torch.long, device=META),
        torch.empty(1, cfg.canvas_length, cfg.vocab_size, device=META),
    )


def ar_depth(cfg: DiffusionGemmaConfig) -> int:
    return serial_depth(CausalLMPass(build_depth_model(cfg)), torch.empty(1, 12, dtype=torch.long, device=META)).depth


def test_patching_the_real_attention_class_changes_the_measured_depth(monkeypatch):
    cfg = tiny_config()
    before = ar_depth(cfg)
    real_forward = Attention.forward

    def doubled_output(self, *args, **kwargs):
        out, k, v = real_forward(self, *args, **kwargs)
        return out * 2.0, k, v  # one elementwise op, on every layer's critical path

    monkeypatch.setattr(Attention, "forward", doubled_output)
    assert ar_depth(cfg) == before + cfg.num_hidden_layers


def test_the_configured_activation_is_traced():
    # The deleted reference stack hard-coded tanh-GELU (8 ops); the real blocks use the config's activation.
    # SiLU is x * sigmoid(x) (2): 6 fewer per layer, where the routed experts' activation is on the chain.
    gelu, silu = ar_depth(tiny_config()), ar_depth(tiny_config(hidden_activation="silu"))
    assert gelu - silu == 6 * tiny_config().num_hidden_layers


def test_load_config_accepts_every_config_form(tmp_path):
    cfg = tiny_config()
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_hf()))
    assert load_config(cfg) is cfg
    assert load_config(cfg.to_hf()) == cfg == load_config(path)
    assert load_config(cfg.to_hf()["text_config"]).hidden_size == 32  # a bare text config
    assert load_config().hidden_size == 2816
