"""ActivationStore: values equal generate_with_cache, resumable without duplicates, bounded, refuses bad input."""

import json

import pytest
import torch

from diffusionlens import HookedDiffusionGemma, RowReplayNoise
from diffusionlens.features import ActivationStore, StoreMismatchError
from diffusionlens.toy import make_dataset

HOOKS = ["decoder.blocks.1.hook_resid_post", "decoder.blocks.4.hook_mlp_out"]


@pytest.fixture(scope="module")
def model():
    return HookedDiffusionGemma.from_pretrained("toy", progress=False)


@pytest.fixture(scope="module")
def prompts():
    return [e.prompt for e in make_dataset("squares", 4, seed=3, split="eval").examples]


def test_rows_equal_generate_with_cache(model, prompts, tmp_path):
    positions = [0, 1, 5]
    store = ActivationStore(tmp_path, model, HOOKS, prompts=prompts[:3], seeds=[7], positions=positions, batch_size=3)
    store.harvest(progress=False)
    ids, mask = model.to_tokens_and_mask(prompts[:3])
    result, cache = model.generate_with_cache(
        ids,
        attention_mask=mask,
        names_filter=HOOKS,
        positions=positions,
        noise=RowReplayNoise([7, 7, 7]),
        progress=False,
    )
    labels = store.labels()
    stop = result.trace[0].stop_step()
    expected_rows = sum((int(stop[r]) + 1) * len(positions) for r in range(3))
    assert len(store) == expected_rows
    for hook in HOOKS:
        acts = store.activations(hook)
        recorded = cache[hook]  # [step, batch, pos, d]
        for i in range(len(store)):
            row, step = int(labels["prompt_id"][i]), int(labels["step"][i])
            j = positions.index(int(labels["position"][i]))
            assert torch.equal(acts[i], recorded[step, row, j].reshape(-1))
    trace = result.trace[0]
    for i in range(len(store)):
        row, step, pos = (int(labels[k][i]) for k in ("prompt_id", "step", "position"))
        assert int(labels["input_token"][i]) == int(trace.input_canvas[step, row, pos])
        assert int(labels["final_token"][i]) == int(trace.final[row, pos])
        assert bool(labels["accepted"][i]) == bool(trace.accepted[step, row, pos])


def test_resume_writes_each_unit_once_and_budget_bounds_shards(model, prompts, tmp_path):
    kwargs = {"prompts": prompts, "seeds": [0, 1], "positions": [0, 2], "batch_size": 2, "max_denoising_steps": 4}
    budget = ActivationStore(tmp_path / "a", model, HOOKS[:1], **kwargs).batch_bytes()  # worst case: 4 steps
    small = ActivationStore(tmp_path / "a", model, HOOKS[:1], max_bytes=budget, **kwargs)
    assert small.harvest(max_units=3, progress=False) > 0
    assert len(small.pending_units()) == 5
    resumed = ActivationStore(tmp_path / "a", model, HOOKS[:1], max_bytes=budget, **kwargs)
    assert len(resumed.completed) == 3
    resumed.harvest(progress=False)
    assert resumed.pending_units() == []
    assert resumed.harvest(progress=False) == 0  # nothing left: a third call writes nothing
    assert len(resumed.shards) > 2  # the small budget forced several shards
    for shard in resumed.shards:
        assert shard["rows"] * resumed.row_bytes() <= resumed.max_bytes

    whole = ActivationStore(tmp_path / "b", model, HOOKS[:1], **kwargs)
    whole.harvest(progress=False)

    def keyed(store):
        labels, acts = store.labels(), store.activations(HOOKS[0])
        keys = [tuple(int(labels[f][i]) for f in ("prompt_id", "seed", "step", "position")) for i in range(len(store))]
        assert len(set(keys)) == len(keys), "a row was written twice"
        return dict(zip(keys, acts, strict=True))

    a, b = keyed(resumed), keyed(whole)
    assert a.keys() == b.keys()
    for key in a:  # other batch-mates change only float rounding (RowReplayNoise fixes each unit's draws)
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-4)


def test_refuses_other_hooks_model_and_small_budget(model, prompts, tmp_path):
    ActivationStore(tmp_path, model, HOOKS[:1], prompts=prompts[:1])
    with pytest.raises(StoreMismatchError, match="hooks"):
        ActivationStore(tmp_path, model, HOOKS, prompts=prompts[:1])
    other_cfg = json.loads(json.dumps(model.cfg.to_hf()))
    other_cfg["text_config"]["rms_norm_eps"] = 1e-5
    other = HookedDiffusionGemma.from_config(other_cfg)
    other.tokenizer = model.tokenizer
    with pytest.raises(StoreMismatchError, match="config_hash"):
        ActivationStore(tmp_path, other, HOOKS[:1], prompts=prompts[:1])
    retrained = HookedDiffusionGemma.from_pretrained("toy", progress=False)
    with torch.no_grad():
        retrained.decoder.embed.W_E[0, 0] += 1.0
    with pytest.raises(StoreMismatchError, match="weights_fingerprint"):
        ActivationStore(tmp_path, retrained, HOOKS[:1], prompts=prompts[:1])
    with pytest.raises(ValueError, match="below one batch"):
        ActivationStore(tmp_path / "x", model, HOOKS, prompts=prompts, batch_size=8, max_bytes=10_000)
    with pytest.raises(ValueError, match="per-step"):
        ActivationStore(tmp_path / "y", model, ["encoder.blocks.0.hook_resid_post"], prompts=prompts)


def test_steps_filter(model, prompts, tmp_path):
    store = ActivationStore(tmp_path, model, HOOKS[:1], prompts=prompts[:2], steps=[1], positions=[0, 1])
    store.harvest(progress=False)
    labels = store.labels()
    assert set(labels["step"].tolist()) == {1}
    assert len(store) == 2 * 2  # both prompts run at least two steps; one row per position


def test_batches_are_seeded_shuffles_of_every_row(model, prompts, tmp_path):
    store = ActivationStore(
        tmp_path,
        model,
        HOOKS[:1],
        prompts=prompts,
        positions=[0, 3],
        batch_size=2,
        max_bytes=2**14,
        max_denoising_steps=4,
    )
    store.harvest(progress=False)
    assert len(store.shards) > 1

    def epoch(seed):
        return torch.cat(list(store.batches(HOOKS[0], 5, seed=seed)))

    first, again, other = epoch(0), epoch(0), epoch(1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    everything = store.activations(HOOKS[0])
    assert first.shape == everything.shape
    sort = lambda x: x[torch.argsort(x[:, 0])]  # noqa: E731
    assert torch.equal(sort(first), sort(everything))
    forever = store.batches(HOOKS[0], 5, epochs=None)
    assert all(next(forever).shape == (5, everything.shape[1]) for _ in range(3 * len(store) // 5))


def test_shard_missing_from_manifest_is_redone_not_duplicated(model, prompts, tmp_path):
    kwargs = {"prompts": prompts[:2], "positions": [0], "batch_size": 1, "max_denoising_steps": 4}
    budget = ActivationStore(tmp_path, model, HOOKS[:1], **kwargs).batch_bytes()
    store = ActivationStore(tmp_path, model, HOOKS[:1], max_bytes=budget, **kwargs)  # one unit per shard
    store.harvest(progress=False)
    rows = len(store)
    # a crash between writing shard 1 and rewriting the manifest: the shard is on disk, unlisted
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"] = manifest["shards"][:1]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    reopened = ActivationStore(tmp_path, model, HOOKS[:1], max_bytes=budget, **kwargs)
    assert reopened.pending_units() == [(1, 0)]
    reopened.harvest(progress=False)
    labels = reopened.labels()
    assert len(reopened) == rows
    assert sorted(labels["prompt_id"].tolist()) == sorted(store.labels()["prompt_id"].tolist())
