"""DenoisingCache: step axis, filters, storage backends, budgets, and agreement with single passes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from reference import CANVAS
from tolerance import readout_atol

from diffusionlens import (
    CacheBudgetError,
    CacheIntegrityError,
    DenoisingCache,
    DiffusionGemmaConfig,
    HookedDiffusionGemma,
    ReplayNoise,
    estimate_cache_bytes,
    hook_specs,
)

GEN = dict(max_denoising_steps=6, noise=ReplayNoise(1), progress=False, eos_token_id=None)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0))


def test_step_axis_and_single_pass_agreement(model, ids):
    names = ["decoder.blocks.*.hook_resid_post", "decoder.self_cond.hook_logits_in", "decoder.hook_logits"]
    result, cache = model.generate_with_cache(ids, names_filter=names, max_new_tokens=CANVAS["mixed"], **GEN)
    n = result.trace.steps(0)
    assert cache.steps(0) == list(range(n))
    assert cache["decoder.blocks.2.hook_resid_post"].shape == (n, 2, CANVAS["mixed"], 32)
    for step in (1, n - 1):
        logits, single = model.run_with_cache(
            ids,
            result.trace[0].input_canvas[step],
            self_cond_logits=cache.get("decoder.self_cond.hook_logits_in", step=step),
        )
        assert torch.equal(logits, cache.get("decoder.hook_logits", step=step))
        for layer in range(4):
            name = f"decoder.blocks.{layer}.hook_resid_post"
            assert torch.equal(single[name], cache.get(name, step=step))
    view = cache.step_cache(2)
    assert torch.equal(view["decoder.blocks.0.hook_resid_post"], cache["decoder.blocks.0.hook_resid_post"][2])
    with pytest.raises(KeyError, match="Nearest"):
        cache["decoder.blocks.0.hook_resid_psot"]


def test_hand_built_cache_counts_steps_back_from_the_runs_length_only(model, ids):
    # Without the run's step count a cache cannot know which step -1 is; it once read it as step 47 of the
    # default 48 and recorded nothing on a 6-step run.
    name = "decoder.hook_logits"
    with pytest.raises(ValueError, match=r"max_steps=max_denoising_steps"):
        DenoisingCache([name], steps=-1)
    result, cache = model.generate_with_cache(
        ids, names_filter=[name], steps=slice(-3, None), max_new_tokens=CANVAS["mixed"], **GEN
    )
    n = result.trace.steps(0)
    assert n > 3 and cache.steps(0) == [s for s in (3, 4, 5) if s < n]
    assert DenoisingCache([name], steps=[0, 2]).canvases() == []  # counting from 0 needs no step count


def test_multi_canvas_get_and_encoder_values(model, ids):
    result, cache = model.generate_with_cache(
        ids, names_filter=["encoder.hook_embed", "sampler.hook_entropy"], max_new_tokens=CANVAS["mixed"] * 2, **GEN
    )
    assert cache.canvases() == [0, 1]
    assert cache.get("encoder.hook_embed", canvas=0).shape[:2] == (2, 9)
    assert cache.get("encoder.hook_embed", canvas=1).shape[:2] == (2, CANVAS["mixed"])
    entropy = cache.get("sampler.hook_entropy", canvas=1)
    assert torch.equal(entropy, result.trace[1].entropy)
    with pytest.raises(KeyError, match="canvas"):
        cache["sampler.hook_entropy"]
    _, later = model.generate_with_cache(
        ids, names_filter="sampler.hook_entropy", canvases=slice(1, None), max_new_tokens=CANVAS["mixed"] * 2, **GEN
    )
    assert later.canvases() == [1]
    assert torch.equal(later["sampler.hook_entropy"], entropy)


def test_filters_hold_exactly_the_requested_bytes(model, ids):
    positions, steps = [0, 3, 5], [1, 2, 4]
    _, cache = model.generate_with_cache(
        ids,
        names_filter="decoder.blocks.*.hook_resid_post",
        positions=positions,
        steps=steps,
        dtype=torch.float16,
        max_new_tokens=CANVAS["mixed"],
        **GEN,
    )
    assert cache.steps(0) == steps
    value = cache["decoder.blocks.1.hook_resid_post"]
    assert value.shape == (3, 2, 3, 32) and value.dtype == torch.float16
    requested = 4 * len(steps) * 2 * len(positions) * 32 * 2  # layers × steps × batch × pos × d_model × bytes
    assert cache.nbytes() == requested


def test_disk_cache_streams_and_reloads_lazily(model, ids, tmp_path):
    kw = dict(names_filter="decoder.blocks.*.hook_resid_post", max_new_tokens=CANVAS["mixed"], **GEN)
    result, memory = model.generate_with_cache(ids, **kw)
    _, disk = model.generate_with_cache(ids, storage="disk", path=tmp_path / "c", **kw)
    assert disk.nbytes() == 0
    reopened = DenoisingCache.load(tmp_path / "c")
    assert reopened.steps(0) == memory.steps(0)
    assert torch.equal(reopened["decoder.blocks.3.hook_resid_post"], memory["decoder.blocks.3.hook_resid_post"])
    assert len(list((tmp_path / "c").glob("*.safetensors"))) == result.trace.steps(0)


def test_interrupted_run_keeps_completed_steps(model, ids, tmp_path):
    def interrupt(x, hook):
        if hook.ctx.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        model.generate_with_cache(
            ids,
            names_filter="decoder.blocks.0.hook_resid_post",
            storage="disk",
            path=tmp_path / "c",
            fwd_hooks=[("decoder.hook_embed", interrupt)],
            max_new_tokens=CANVAS["mixed"],
            **GEN,
        )
    assert not model.has_hooks
    with pytest.raises(CacheIntegrityError, match="unfinished cache.*allow_partial=True"):
        DenoisingCache.load(tmp_path / "c")
    with pytest.warns(UserWarning, match=r"read what finished: canvas 0: steps \[0, 1, 2\]"):
        reopened = DenoisingCache.load(tmp_path / "c", allow_partial=True)
    assert not reopened.complete and reopened.steps(0) == [0, 1, 2]
    assert reopened["decoder.blocks.0.hook_resid_post"].shape[0] == 3


def test_newer_format_and_path_traversal_are_refused(model, ids, tmp_path):
    model.generate_with_cache(
        ids, names_filter="decoder.hook_embed", storage="disk", path=tmp_path / "c", max_new_tokens=8, **GEN
    )
    manifest_path = tmp_path / "c" / "manifest.jsonl"
    entries = [json.loads(line) for line in manifest_path.read_text().splitlines()]
    entries[0]["file"] = "../../etc/passwd"
    manifest_path.write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    (tmp_path / "c" / "complete.json").unlink()  # the marker would refuse the edited manifest first
    with pytest.raises(ValueError, match="shard file '../../etc/passwd'.*refusing to open it"):
        DenoisingCache.load(tmp_path / "c", allow_partial=True)
    meta_path = Path(tmp_path / "c" / "cache.json")
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="newer diffusionlens"):
        DenoisingCache.load(tmp_path / "c")


def test_budget_refuses_up_front_with_the_estimate(model, ids):
    calls = []
    with pytest.raises(CacheBudgetError, match="MiB"):
        model.generate_with_cache(
            ids,
            names_filter=None,
            max_bytes=10_000,
            fwd_hooks=[("decoder.hook_embed", lambda x, h: calls.append(1))],
            max_new_tokens=8,
            **GEN,
        )
    assert calls == []  # refused before any pass ran


def test_estimate_matches_what_is_recorded(model, ids):
    names = ["decoder.blocks.0.hook_resid_post", "decoder.blocks.1.attn.hook_pattern", "sampler.hook_accepted"]
    result, cache = model.generate_with_cache(ids, names_filter=names, max_new_tokens=8, **GEN)
    n = result.trace.steps(0)
    estimate = estimate_cache_bytes(model.cfg, names, batch=2, prompt_len=9, steps=n, dtype=torch.float32)
    assert estimate == cache.nbytes()


def test_hook_specs_name_every_hook_point(model):
    assert set(hook_specs(model.cfg)) == set(model.hook_dict)


def test_estimate_on_the_real_26b_config():
    path = Path(__file__).parents[2] / "diffusionlens" / "serial_depth" / "diffusiongemma_26b_a4b_text.json"
    cfg = DiffusionGemmaConfig.from_hf(path)
    per_step = estimate_cache_bytes(cfg, ["decoder.blocks.0.hook_resid_post"], steps=1, dtype=torch.bfloat16)
    assert per_step == 256 * 2816 * 2
    everything = estimate_cache_bytes(cfg, prompt_len=1024, steps=48)
    assert everything > 10**11  # every hook for a whole generation: hundreds of GB, hence the filters
    tiny = HookedDiffusionGemma.from_config(
        cfg.replace(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=8,
            num_experts=4,
            top_k_experts=2,
            moe_intermediate_size=4,
            head_dim=4,
            global_head_dim=8,
            num_hidden_layers=6,
            layer_types=None,
            canvas_length=4,
        )
    )
    assert set(hook_specs(tiny.cfg)) == set(tiny.hook_dict)


def test_logit_lens_at_every_step(model, ids):
    names = ["decoder.blocks.*.hook_resid_pre", "decoder.blocks.3.hook_resid_post", "decoder.hook_logits"]
    result, cache = model.generate_with_cache(ids, names_filter=names, max_new_tokens=CANVAS["mixed"], **GEN)
    for step in cache.steps(0):
        lens = cache.logit_lens(step=step)
        assert lens.shape == (5, 2, CANVAS["mixed"], 97)
        logits = cache.get("decoder.hook_logits", step=step)
        assert torch.allclose(lens[-1], logits, rtol=0, atol=readout_atol(model, logits))
    assert not torch.allclose(cache.logit_lens(step=0)[1], cache.logit_lens(step=0)[-1])
