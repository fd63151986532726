"""Probes by step: split by prompt, scores per hook × step, baselines, figure."""

import pytest
import torch

from diffusionlens import HookedDiffusionGemma
from diffusionlens.features import ActivationStore
from diffusionlens.features.probes import split_prompts, train_probe
from diffusionlens.toy import make_dataset

HOOKS = ["decoder.blocks.0.hook_resid_post", "decoder.blocks.5.hook_resid_post"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    model = HookedDiffusionGemma.from_pretrained("toy", progress=False)
    prompts = [e.prompt for e in make_dataset("squares", 16, seed=11, split="eval").examples]
    store = ActivationStore(
        tmp_path_factory.mktemp("store"),
        model,
        HOOKS,
        prompts=prompts,
        seeds=[0, 1],
        positions=list(range(12)),
        batch_size=32,
    )
    store.harvest(progress=False)
    return store


def test_input_token_is_decodable_and_beats_the_baseline(store):
    result = train_probe(store, "input_token", progress=False, seed=1)
    assert result.score.shape == (2, len(result.steps))
    assert result.steps[0] == 0
    # the residual carries the embedding of the token it reads: near perfect at step 0, far above majority
    assert result.score[0, 0] > 0.9
    assert result.score[0, 0] > result.baseline[0] + 0.3
    assert "majority baseline" in result.table()


def test_split_is_by_prompt(store):
    labels = store.labels()
    # a label that is random per prompt but constant over its rows: a row split would let the probe
    # recognise the prompt and score high; a prompt split cannot beat chance by much.
    per_prompt = torch.randint(0, 2, (len(store.prompts),), generator=torch.Generator().manual_seed(0))
    result = train_probe(store, lambda lab: per_prompt[lab["prompt_id"]], hooks=HOOKS[1:], steps=[0], progress=False)
    assert float(result.score[0, 0]) < 0.8
    test = split_prompts(len(store.prompts), 0.25, 0)
    assert set(test) == set(train_probe(store, "input_token", hooks=HOOKS[:1], steps=[0], progress=False).test_prompts)
    assert 0 < len(test) < len(store.prompts)
    assert labels["prompt_id"].max() == len(store.prompts) - 1


def test_linear_probe_recovers_a_linear_target(store):
    direction = torch.randn(192, generator=torch.Generator().manual_seed(0))
    target = store.activations(HOOKS[0]) @ direction
    # steps 0 and 1 hold more rows than the residual has dimensions, so the fit is determined
    result = train_probe(store, target, hooks=HOOKS[:1], kind="linear", steps=[0, 1], l2=1e-6, progress=False)
    assert result.score.min() > 0.99
    shuffled = target[torch.randperm(len(target), generator=torch.Generator().manual_seed(0))]
    shuffled = train_probe(store, shuffled, hooks=HOOKS[:1], kind="linear", steps=[0, 1], progress=False)
    assert shuffled.score.max() < 0.2


def test_probe_figure(store):
    pytest.importorskip("matplotlib")
    from diffusionlens.viz.features import plot_probe_accuracy

    result = train_probe(store, "final_token", rows=lambda lab: lab["position"] == 0, progress=False)
    fig = plot_probe_accuracy(result, names=["layer 0", "layer 5"])
    assert len(fig.axes[0].texts) == 2 * len(result.steps)


def test_a_row_selection_that_selects_nothing_is_refused(store):
    with pytest.raises(ValueError, match="rows= selects none of the store's .* rows; widen it"):
        train_probe(store, "input_token", rows=lambda labels: labels["position"] == 99, progress=False)
