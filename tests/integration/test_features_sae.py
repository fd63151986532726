"""SAEs through SAELens: trained by SAETrainer from a store, spliced per step, saved and reloaded by SAELens."""

import pytest
import torch

from diffusionlens import HookedDiffusionGemma, ReplayNoise
from diffusionlens.features import ActivationStore
from diffusionlens.features.sae import generate_with_sae, sae_hooks, sae_metrics, top_activations, train_sae
from diffusionlens.toy import make_dataset

sae_lens = pytest.importorskip("sae_lens")
HOOK = "decoder.blocks.3.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    return HookedDiffusionGemma.from_pretrained("toy", progress=False)


@pytest.fixture(scope="module")
def trained(model, tmp_path_factory):
    prompts = [e.prompt for e in make_dataset("squares", 6, seed=5, split="eval").examples]
    store = ActivationStore(tmp_path_factory.mktemp("store"), model, [HOOK], prompts=prompts, max_denoising_steps=8)
    store.harvest(progress=False)
    out = tmp_path_factory.mktemp("sae")
    sae = train_sae(store, HOOK, d_sae=64, training_samples=8192, batch_size=256, lr=3e-3, out=out, progress=False)
    return store, sae, out, prompts


def test_trained_sae_reloads_with_sae_lens_alone(trained):
    store, sae, out, _ = trained
    reloaded = sae_lens.SAE.load_from_disk(out)
    assert isinstance(reloaded, sae_lens.StandardSAE)
    assert reloaded.cfg.metadata.hook_name == HOOK
    x = store.activations(HOOK)[:50]
    assert torch.equal(reloaded.encode(x), sae.encode(x))
    metrics = sae_metrics(sae, store, HOOK)
    assert metrics["rows"] == len(store)
    assert metrics["explained_variance"] > 0.3  # it learnt something: a random SAE is far below 0
    assert 0 < metrics["l0"] < 64


def test_error_term_splice_is_exact_and_plain_splice_is_recorded(model, trained):
    _, sae, _, prompts = trained
    ids, mask = model.to_tokens_and_mask(prompts)
    kwargs = {"attention_mask": mask, "noise": ReplayNoise(3), "progress": False}
    clean = model.generate(ids, **kwargs)
    with_error, _, features = generate_with_sae(model, ids, sae, HOOK, use_error_term=True, **kwargs)
    assert torch.equal(with_error.sequences, clean.sequences)
    acts = features[HOOK + ".hook_sae_acts_post"]
    assert acts.shape == (with_error.trace.steps(), len(prompts), 48, 64)
    _, cache = model.generate_with_cache(ids, names_filter=[HOOK], **kwargs)
    assert torch.allclose(acts, sae.encode(cache[HOOK]), atol=1e-5)
    # without the error term the site holds the reconstruction: check it at the hook itself
    _, spliced_cache = model.generate_with_cache(
        ids, names_filter=[HOOK.replace("3", "4")], fwd_hooks=sae_hooks(sae, HOOK, steps=[0]), **kwargs
    )
    _, clean_cache = model.generate_with_cache(ids, names_filter=[HOOK.replace("3", "4")], **kwargs)
    assert not torch.equal(spliced_cache[HOOK.replace("3", "4")][0], clean_cache[HOOK.replace("3", "4")][0])


def test_feature_edit_with_error_term_changes_only_through_the_edit(model, trained):
    _, sae, _, prompts = trained
    ids, mask = model.to_tokens_and_mask(prompts[:2])
    # Step 0 of the first canvas reads the same input in both runs, whatever the edit does later: how long
    # the edited run goes on depends on the trained SAE, and so on the CPU's rounding during training.
    kwargs = {"attention_mask": mask, "noise": ReplayNoise(3), "progress": False, "steps": [0], "canvases": [0]}
    _, base = model.generate_with_cache(ids, names_filter=[HOOK], **kwargs)
    hooks = sae_hooks(sae, HOOK, use_error_term=True, feature_edit=lambda a, h: a * 0)
    _, edited = model.generate_with_cache(ids, names_filter=[HOOK], fwd_hooks=hooks, **kwargs)
    x = base.get(HOOK, canvas=0, step=0)
    expected = x + sae.decode(torch.zeros_like(sae.encode(x))) - sae.decode(sae.encode(x))
    torch.testing.assert_close(edited.get(HOOK, canvas=0, step=0), expected)


def test_top_examples_and_refusals(model, trained):
    store, sae, _, prompts = trained
    examples = top_activations(sae, store, HOOK, k=4, progress=False)
    acts = sae.encode(store.activations(HOOK))
    best = int(acts.max(0).values.argmax())
    assert torch.allclose(examples.values[best], acts[:, best].topk(4).values)
    assert int(examples.rows[best, 0]) == int(acts[:, best].argmax())
    assert examples.mean_by_step.shape[0] == 64
    assert "feature" in examples.describe(best, prompts)
    with pytest.raises(ValueError, match="trained on"):
        sae_hooks(sae, "decoder.blocks.2.hook_resid_post", model=model)
    narrow = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=96, d_sae=8))
    ids, mask = model.to_tokens_and_mask(prompts[:1])
    with pytest.raises(ValueError, match="d_in=96"):
        generate_with_sae(model, ids, narrow, HOOK, attention_mask=mask, progress=False)
