"""Metrics say what they read: which run, canvas and step, and whether the logits are before or after the
final soft-cap. A free sweep's `step=-1` reads each patched run's own last step and its metadata says so
(it reported the corrupted run's step); a frozen sweep's resolves to the corrupted run's last step.
`LogitDiff` reads soft-capped logits, `dla_by_step` explains the pre-cap logit and reports both."""

from __future__ import annotations

import pytest
import torch
from tolerance import readout_atol

from diffusionlens import ReplayNoise
from diffusionlens.analysis import DLA_NAMES, dla_by_step
from diffusionlens.patching import (
    ExactMatch,
    KLToClean,
    LogitDiff,
    Normalized,
    Patch,
    TargetProb,
    attribution_patch,
    patch_sweep,
    record_run,
    run_patched,
)
from diffusionlens.patching.metrics import POST_SOFTCAP, PRE_SOFTCAP, metric_reads

HOOK = "decoder.blocks.{layer}.hook_resid_pre"
GEN = dict(noise=ReplayNoise(0), max_new_tokens=12)


@pytest.fixture(scope="module")
def runs(toy):
    names = [HOOK.format(layer=layer) for layer in range(toy.cfg.num_hidden_layers)]
    clean = record_run(toy, toy.to_tokens("squares 400 800:"), names_filter=names, **GEN)
    corrupted = record_run(toy, toy.to_tokens("squares 600 800:"), **GEN)
    return clean, corrupted


def test_every_metric_states_run_canvas_step_and_logits(runs):
    clean, _ = runs
    logit_diff = LogitDiff(3, 8, 7, step=2, canvas=1)
    assert logit_diff.reads() == {
        "metric": "LogitDiff",
        "run": "scored",
        "canvas": 1,
        "step": 2,
        "logits": POST_SOFTCAP,
    }
    assert TargetProb(0, 5).reads()["logits"] == POST_SOFTCAP
    assert KLToClean(clean).reads()["run"] == "scored and clean"
    assert ExactMatch(torch.zeros(1, 4, dtype=torch.long)).reads()["step"] == "final"
    normalized = Normalized(logit_diff, 1.0, 0.0).reads()
    assert normalized["step"] == 2 and "normalized" in normalized
    anything = metric_reads(lambda run: 0.0)
    assert anything["run"] == "scored" and anything["step"] is None


def test_a_free_sweep_reads_each_cells_own_last_step_and_says_so(toy, runs):
    clean, corrupted = runs
    metric = LogitDiff(0, "8", "4")  # step=-1
    # layer 4, position 5: the patched run runs another number of steps than the corrupted run
    sweep = patch_sweep(
        toy,
        clean,
        corrupted,
        HOOK,
        ("layer", "position"),
        metric,
        mode="free",
        layers=[4],
        positions=[5, 0],
        path="reference",
        progress=False,
    )
    patched = run_patched(toy, corrupted, Patch(HOOK.format(layer=4), clean.cache, positions=5), mode="free")
    base_last = corrupted.trace.steps(0) - 1
    assert patched.trace.steps(0) - 1 != base_last, "the cell stops where the base run does: no power"
    resolved = metric.with_token_ids(toy)
    assert sweep.values[0, 0].item() == resolved(patched)  # its own last step
    assert sweep.values[0, 0].item() != float(resolved.on_logits(patched.logits_at(base_last)))
    reads = sweep.metadata["metric_reads"]
    assert reads["run"] == "patched (free)" and reads["step"] == -1 and reads["logits"] == POST_SOFTCAP
    assert "each cell's own patched run" in reads["step_counted_from"]
    assert sweep.metadata["metric_steps"] is None  # it said [the corrupted run's last step]
    fast = patch_sweep(
        toy,
        clean,
        corrupted,
        HOOK,
        ("layer", "position"),
        metric,
        mode="free",
        layers=[4],
        positions=[5, 0],
        progress=False,
    )
    assert fast.metadata["metric_reads"] == reads


def test_a_frozen_sweep_resolves_a_negative_step_on_the_corrupted_run(toy, runs):
    clean, corrupted = runs
    metric = LogitDiff(0, "8", "4")
    sweep = patch_sweep(
        toy, clean, corrupted, HOOK, ("layer", "position"), metric, layers=[4], positions=[5], progress=False
    )
    last = corrupted.trace.steps(0) - 1
    reads = sweep.metadata["metric_reads"]
    assert reads["step"] == last == sweep.metadata["metric_steps"][0]
    assert reads["run"] == "patched (frozen)" and "corrupted run" in reads["step_counted_from"]
    steps = patch_sweep(
        toy,
        clean,
        corrupted,
        HOOK,
        ("step", "position"),
        metric,
        layers=[4],
        positions=[5],
        metric_steps="cell",
        progress=False,
    )
    assert steps.metadata["metric_reads"]["step"] == "cell"


def test_attribution_states_that_it_reads_each_step_of_its_axis(toy, runs):
    clean, corrupted = runs
    result = attribution_patch(toy, clean, corrupted, HOOK, LogitDiff(0, "8", "4"), layers=[4], steps=[0])
    reads = result.metadata["metric_reads"]
    assert reads["step"] == "each step of the step axis" and reads["logits"] == POST_SOFTCAP
    assert reads["run"].startswith("corrupted")


def test_dla_reports_its_logit_before_and_after_the_softcap_as_logit_diff_reads_it(toy):
    ids = toy.to_tokens("squares 400 800:")
    names = [*DLA_NAMES, "decoder.hook_logits"]
    _, cache = toy.generate_with_cache(ids, names_filter=names, progress=False, noise=ReplayNoise(40))
    run = record_run(toy, ids, noise=ReplayNoise(40))
    dla = dla_by_step(cache, "8", other="7", position=0)
    assert dla.logits_read == PRE_SOFTCAP and dla.reads()["logits"] == PRE_SOFTCAP
    assert dla.reads()["step"] == dla.steps and dla.reads()["canvas"] == 0 and dla.reads()["row"] == 0
    for i, step in enumerate(dla.steps):
        metric = LogitDiff(0, "8", "7", step=step).with_token_ids(toy)
        logits = run.logits_at(step)
        # the final norm and unembedding recomputed from the cached norm output: another matmul shape
        torch.testing.assert_close(
            dla.logit_softcapped[i], torch.tensor(metric(run)), atol=readout_atol(toy, logits), rtol=0
        )
    # the cap changes the number: the two readings are not interchangeable
    assert (dla.logit - dla.logit_softcapped).abs().max() > 0.1
    single = dla_by_step(cache, "8", position=0)
    cap = toy.cfg.final_logit_softcapping
    torch.testing.assert_close(single.logit_softcapped, torch.tanh(single.logit / cap) * cap)
    assert dla.keep_top(2).logit_softcapped is dla.logit_softcapped
