"""Steering: contrastive directions, step schedules, positions and canvases, coefficient sweeps."""

import pytest
import torch

from diffusionlens import HookedDiffusionGemma, ReplayNoise
from diffusionlens.features.steering import mean_difference, schedule_scale, steering_hooks, steering_sweep
from diffusionlens.patching import TargetProb
from diffusionlens.toy import make_dataset

HOOK = "decoder.blocks.4.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    return HookedDiffusionGemma.from_pretrained("toy", progress=False)


@pytest.fixture(scope="module")
def batch(model):
    prompts = [e.prompt for e in make_dataset("squares", 3, seed=2, split="eval").examples]
    return model.to_tokens_and_mask(prompts)


def test_schedules():
    assert [schedule_scale("all", s) for s in range(3)] == [1, 1, 1]
    assert [schedule_scale(("first", 2), s) for s in range(4)] == [1, 1, 0, 0]
    assert [schedule_scale(("ramp", 4), s) for s in range(6)] == [1, 0.75, 0.5, 0.25, 0, 0]
    assert schedule_scale(lambda s: 0.5 * s, 3) == 1.5
    with pytest.raises(ValueError, match="schedule"):
        steering_hooks(torch.zeros(192), HOOK, schedule="sometimes")


def test_hooks_add_exactly_the_scheduled_direction_at_chosen_positions(model, batch):
    ids, mask = batch
    direction = torch.randn(192, generator=torch.Generator().manual_seed(0))
    seen: dict[str, dict[int, torch.Tensor]] = {"before": {}, "after": {}}

    def recorder(which):
        def record(x, hook):
            seen[which][hook.ctx.step] = x.clone()
            return x

        return record

    steer = steering_hooks(direction, HOOK, coefficient=2.0, positions=[0, 5], schedule=("ramp", 2))
    hooks = [(HOOK, recorder("before")), *steer, (HOOK, recorder("after"))]
    model.generate(ids, attention_mask=mask, fwd_hooks=hooks, noise=ReplayNoise(0), progress=False)
    assert len(seen["after"]) >= 2
    for step, after in seen["after"].items():
        delta = after - seen["before"][step]
        scale = 2.0 * max(0.0, 1 - step / 2)
        torch.testing.assert_close(delta[:, [0, 5]], (scale * direction).expand(3, 2, 192))
        others = [p for p in range(48) if p not in (0, 5)]
        assert torch.equal(delta[:, others], torch.zeros_like(delta[:, others]))
    # canvases that are not chosen are left alone
    untouched = steering_hooks(direction, HOOK, coefficient=5.0, canvases=[1])
    clean = model.generate(ids, attention_mask=mask, noise=ReplayNoise(0), progress=False)
    other = model.generate(ids, attention_mask=mask, fwd_hooks=untouched, noise=ReplayNoise(0), progress=False)
    assert torch.equal(clean.sequences, other.sequences)


def test_mean_difference_and_sweep(model, batch):
    ids, mask = batch
    run = {"attention_mask": mask, "noise": ReplayNoise(0), "progress": False}
    _, cache = model.generate_with_cache(ids, names_filter=[HOOK], positions=[0, 1], **run)
    values = cache[HOOK]  # [step, batch, pos, d]
    half = mean_difference(cache, values[:, :1], HOOK, positions=[1])
    torch.testing.assert_close(half, values[:, :, 1].reshape(-1, 192).mean(0) - values[:, :1].reshape(-1, 192).mean(0))
    metric = TargetProb(position=0, token=int(model.to_tokens("4")[0, -1]))
    sweep = steering_sweep(model, ids, half, HOOK, [0.0, 3.0], metric, positions=0, **run)
    assert sweep.shape == (2,)
    from diffusionlens.patching import record_run

    assert sweep[0] == pytest.approx(metric(record_run(model, ids, **run)))
    assert sweep[1] != sweep[0]


@pytest.mark.parametrize(
    ("direction", "hooks", "error", "match"),
    [
        (torch.ones(7), HOOK, ValueError, r"must be a vector of 192 values \(its last axis\), got \(7,\)"),
        (torch.ones(2, 192), HOOK, ValueError, r"vector of 192 values .* got \(2, 192\)"),
        (
            torch.ones(192),
            "decoder.blocks.4.hook_resid_psot",
            KeyError,
            "Nearest names: decoder.blocks.4.hook_resid_post",
        ),
    ],
)
@pytest.mark.without_shape_checks  # the library's own message, which the annotation check would pre-empt
def test_a_bad_direction_is_refused_before_generating(model, batch, direction, hooks, error, match):
    ids, _ = batch
    fired = []
    model.add_hook("encoder.hook_embed", lambda x, hook: fired.append(hook.name))
    try:
        with pytest.raises(error, match=match):
            steering_sweep(model, ids, direction, hooks, [0.0, 1.0], lambda run: 0.0, progress=False)
        with pytest.raises(error, match=match):
            steering_hooks(direction, hooks, model=model)
    finally:
        model.reset_hooks()
    assert fired == []  # refused before the prompt was encoded
