"""Device maps: accelerate's plans for the real 26B config (meta device, no weights) stay within
budget; explicit and `max_memory` placements run and equal the plain model; bad maps are refused
with the module names or the shortfall before any tensor is read."""

from __future__ import annotations

import pytest
import torch
from accelerate.hooks import AlignDevicesHook
from reference import CANVAS, CONFIGS, build_pair

from diffusionlens import DiffusionGemmaConfig, HookedDiffusionGemma, ReplayNoise
from diffusionlens.patching import Patch
from diffusionlens.sampling.settings import GenerationSettings
from diffusionlens.weights.device_map import DeviceMapError, placed_bytes, plan_device_map

REAL_CONFIG = "diffusionlens/serial_depth/diffusiongemma_26b_a4b_text.json"
NAME = "mixed"


@pytest.fixture(scope="module")
def real_cfg():
    return DiffusionGemmaConfig.from_hf(REAL_CONFIG)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    reference, ours = build_pair(NAME, seed=3)
    directory = tmp_path_factory.mktemp("ckpt")
    ours.save_pretrained(directory, max_shard_size="20KB")
    return directory, ours


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(
    "budget",
    [{0: "80GB"}, {0: "48GB", 1: "48GB"}, {i: "24GB" for i in range(4)}],
    ids=["1x80GB", "2x48GB", "4x24GB"],
)
def test_auto_plans_for_the_26b_config_stay_within_budget(real_cfg, budget):
    device_map = plan_device_map(real_cfg, "auto", budget, dtype=torch.bfloat16)
    used = placed_bytes(real_cfg, device_map, torch.bfloat16)
    assert set(used) == set(budget), "every device should get a share"
    for device, nbytes in used.items():
        assert nbytes <= int(budget[device].removesuffix("GB")) * 10**9, (device, nbytes)
    assert sum(used.values()) > 50e9  # the whole 26B model in bf16 (~50.5 GB) is placed
    for layer in range(real_cfg.num_hidden_layers):
        assert device_map[f"encoder.blocks.{layer}"] == device_map[f"decoder.blocks.{layer}"]
    blocks = [device_map[f"decoder.blocks.{layer}"] for layer in range(real_cfg.num_hidden_layers)]
    assert blocks == sorted(blocks), "blocks are placed in order, so activations cross each boundary once"


def test_too_small_max_memory_is_refused_with_the_shortfall(real_cfg, checkpoint):
    with pytest.raises(DeviceMapError, match=r"2\.50 GB short"):
        plan_device_map(real_cfg, "auto", {0: "24GB", 1: "24GB"}, dtype=torch.bfloat16)
    directory, ours = checkpoint
    weight_bytes = sum(p.numel() * 4 for p in ours.decoder.parameters())
    with pytest.raises(DeviceMapError, match="GB short"):
        HookedDiffusionGemma.from_pretrained(directory, max_memory={"cpu": weight_bytes // 2}, progress=False)


def test_bad_explicit_maps_are_refused_with_the_names(checkpoint):
    directory, ours = checkpoint
    with pytest.raises(DeviceMapError, match=r"do not exist: \['decoder.blocks.9'\]"):
        HookedDiffusionGemma.from_pretrained(directory, device_map={"": "cpu", "decoder.blocks.9": "cpu"})
    partial = {"decoder.embed": "cpu", "decoder.self_cond": "cpu", "decoder.ln_final": "cpu"}
    partial |= {f"decoder.blocks.{i}": "cpu" for i in (0, 1, 2)}
    with pytest.raises(DeviceMapError, match=r"unplaced: \['decoder.blocks.3'\]"):
        HookedDiffusionGemma.from_pretrained(directory, device_map=partial)
    with pytest.raises(DeviceMapError, match="share weights"):
        plan_device_map(ours.cfg, {"": "cpu", "encoder.blocks.1": "meta"})
    with pytest.raises(DeviceMapError, match="placed whole"):
        plan_device_map(ours.cfg, {"": "cpu", "decoder.blocks.1.attn": "meta"})


def _generate(model, ids, **kw):
    settings = dict(max_new_tokens=CANVAS[NAME] * 2, max_denoising_steps=6, noise=ReplayNoise(4), progress=False)
    return model.generate(ids, **settings, **kw)


@pytest.mark.parametrize(
    "placement",
    [
        {"device_map": {"decoder": "cpu", "encoder.blocks": "cpu"}},
        {
            "device_map": {f"decoder.blocks.{i}": "cpu" for i in range(4)}
            | {"decoder.embed": "cpu", "decoder.self_cond": "cpu", "decoder.ln_final": "cpu"}
        },
        {"max_memory": {"cpu": "1GB"}},
    ],
    ids=["parents", "every-unit", "max_memory"],
)
def test_placed_model_equals_the_plain_model(checkpoint, placement):
    directory, _ = checkpoint
    plain = HookedDiffusionGemma.from_pretrained(directory, progress=False)
    placed = HookedDiffusionGemma.from_pretrained(directory, progress=False, **placement)
    assert set(placed.device_map.values()) == {"cpu"}
    assert isinstance(placed.decoder.blocks[2]._hf_hook, AlignDevicesHook)
    assert placed.encoder.blocks[2].attn.q_proj.weight is placed.decoder.blocks[2].attn.q_proj.weight, (
        "ties survive dispatch"
    )
    vocab = CONFIGS[NAME]["vocab_size"]
    ids = torch.randint(3, vocab, (2, 5), generator=torch.Generator().manual_seed(0))
    canvas = torch.randint(0, vocab, (2, CANVAS[NAME]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(placed(ids, canvas), plain(ids, canvas))
    assert torch.equal(_generate(placed, ids).sequences, _generate(plain, ids).sequences)
    # Caches, hooks and patching run through the placed blocks as through the plain ones.
    hook = "decoder.blocks.{layer}.hook_resid_post"
    names = [hook.format(layer=layer) for layer in range(4)]
    settings = dict(max_new_tokens=CANVAS[NAME] * 2, max_denoising_steps=6, progress=False, storage="cpu")
    _, cache_placed = placed.generate_with_cache(ids, names_filter=names, noise=ReplayNoise(4), **settings)
    _, cache_plain = plain.generate_with_cache(ids, names_filter=names, noise=ReplayNoise(4), **settings)
    for name in names:
        assert cache_placed.get(name, canvas=0).device.type == "cpu"
        assert torch.equal(cache_placed.get(name, canvas=1), cache_plain.get(name, canvas=1))
    zero = Patch("decoder.blocks.2.hook_resid_post", lambda value, hook: value * 0)
    patched = [_generate(m, ids, fwd_hooks=zero.hooks(m)).sequences for m in (placed, plain)]
    assert torch.equal(patched[0], patched[1])


TOY_PROMPTS = ["squares 400 800:", "347+589=", "squares 100 300:"]
CUDA_MAPS = {
    "cpu-main": {"": "cpu", "decoder.blocks.1": "cuda:0", "decoder.blocks.2": 0},
    "cuda-main": {"": 0, "decoder.blocks.4": "cpu"},
}


def _toy_runs(model, prompt):
    """Tokens, the residual cache and a patched run's tokens of one seeded toy generation."""
    ids = model.to_tokens(prompt).to(model.decoder.embed.W_E.device)
    names = [f"decoder.blocks.{layer}.hook_resid_post" for layer in range(model.cfg.num_hidden_layers)]
    settings = dict(noise=ReplayNoise(0), progress=False)
    out, cache = model.generate_with_cache(ids, names_filter=names, storage="cpu", **settings)
    halve = Patch("decoder.blocks.2.hook_resid_post", lambda value, hook: value * 0.5)
    patched = model.generate(ids, fwd_hooks=halve.hooks(model, GenerationSettings.max_denoising_steps), **settings)
    return out.sequences.cpu(), cache, patched.sequences.cpu()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu.sh runs it on one)")
@pytest.mark.parametrize("device_map", CUDA_MAPS.values(), ids=CUDA_MAPS.keys())
def test_toy_split_over_cuda_and_cpu_gives_the_cpu_tokens(device_map):
    """The trained toy split over cuda:0 and cpu writes the tokens the all-CPU model writes (plain and
    patched), and its per-step residual cache matches to kernel rounding. A trained model is used
    because a random one's near-uniform entropies make acceptance order hinge on 1e-7 differences
    between CPU and CUDA kernels, which no split can promise to preserve."""
    plain = HookedDiffusionGemma.from_pretrained("toy", progress=False)
    placed = HookedDiffusionGemma.from_pretrained("toy", progress=False, device_map=device_map)
    assert {p.device.type for p in placed.parameters()} == {"cpu", "cuda"}
    for prompt in TOY_PROMPTS:
        tokens, cache, patched = _toy_runs(placed, prompt)
        tokens_cpu, cache_cpu, patched_cpu = _toy_runs(plain, prompt)
        assert torch.equal(tokens, tokens_cpu), prompt
        assert torch.equal(patched, patched_cpu), prompt
        assert cache.steps(0) == cache_cpu.steps(0)
        for name in cache_cpu:
            assert cache.get(name).device.type == "cpu"
            torch.testing.assert_close(cache.get(name), cache_cpu.get(name), atol=1e-4, rtol=1e-4)


def test_planning_tree_has_the_models_modules():
    # The planner builds the module tree from the stacks, without the model class (which loads through it):
    # a module added to the model but not to the tree would make valid maps "name modules that do not exist".
    from diffusionlens.weights.device_map import empty_module_tree, unit_bytes

    cfg = DiffusionGemmaConfig.from_hf(CONFIGS[NAME])
    model = HookedDiffusionGemma.from_config(cfg)
    assert [name for name, _ in empty_module_tree(cfg).named_modules()] == [n for n, _ in model.named_modules()]
    sizes = unit_bytes(cfg, torch.float32)
    real = {name: sum(p.numel() * 4 for p in [*m.parameters(), *m.buffers()]) for name, m in model.named_modules()}
    assert sizes == {unit: real[unit] for unit in sizes}
