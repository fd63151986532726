"""SAEs through SAELens: trained by SAETrainer from a store, spliced per step, saved and reloaded by SAELens."""

import warnings

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


def test_sae_own_use_error_term_is_honoured_unless_overridden(model, trained):
    _, sae, _, prompts = trained
    ids, mask = model.to_tokens_and_mask(prompts[:2])
    kwargs = {"attention_mask": mask, "noise": ReplayNoise(3), "progress": False}
    clean = model.generate(ids, **kwargs)
    spliced = model.generate(ids, fwd_hooks=sae_hooks(sae, HOOK), **kwargs)
    assert not torch.equal(spliced.sequences, clean.sequences)  # the reconstruction alone changes the run
    with warnings.catch_warnings():  # SAELens 6.54 asks for HookedSAETransformer.add_sae; the attribute still counts
        warnings.simplefilter("ignore", DeprecationWarning)
        sae.use_error_term = True
    try:
        own = model.generate(ids, fwd_hooks=sae_hooks(sae, HOOK), **kwargs)
        overridden = model.generate(ids, fwd_hooks=sae_hooks(sae, HOOK, use_error_term=False), **kwargs)
        recorded, _, _ = generate_with_sae(model, ids, sae, HOOK, **kwargs)
    finally:
        sae.use_error_term = False
    assert torch.equal(own.sequences, clean.sequences) and torch.equal(recorded.sequences, clean.sequences)
    assert torch.equal(overridden.sequences, spliced.sequences)


Z_HOOK = "decoder.blocks.2.attn.hook_z"


def hook_z_sae(model, reshape: str):
    """A seeded random SAELens SAE on Z_HOOK ([batch, pos, head, d_head]), with SAELens's hook_z reshaping on or off."""
    heads, d_head = model.cfg.num_attention_heads, model.cfg.layer_head_dim(2)
    metadata = sae_lens.saes.sae.SAEMetadata(hook_name=Z_HOOK)
    torch.manual_seed(0)
    config = sae_lens.StandardSAEConfig(d_in=heads * d_head, d_sae=32, reshape_activations=reshape, metadata=metadata)
    return sae_lens.StandardSAE(config)


def test_hook_z_sae_is_spliced_on_the_flattened_heads(model):
    from diffusionlens.features import sae_width

    heads, d_head = model.cfg.num_attention_heads, model.cfg.layer_head_dim(2)
    assert sae_width(model, Z_HOOK) == heads * d_head
    flat_sae, reshaping_sae = hook_z_sae(model, "none"), hook_z_sae(model, "hook_z")
    assert reshaping_sae.hook_z_reshaping_mode and not flat_sae.hook_z_reshaping_mode
    ids = model.to_tokens("squares 4 8:")
    kwargs = {"noise": ReplayNoise(1), "progress": False, "steps": [0], "canvases": [0], "names_filter": [Z_HOOK]}
    _, clean = model.generate_with_cache(ids, **kwargs)
    z = clean.get(Z_HOOK, canvas=0, step=0)
    assert z.shape[-2:] == (heads, d_head)
    expected = flat_sae.decode(flat_sae.encode(z.flatten(-2))).unflatten(-1, (heads, d_head))
    spliced = {}
    for name, sae in (("flat", flat_sae), ("reshaping", reshaping_sae)):
        hooks = sae_hooks(sae, Z_HOOK, steps=[0], model=model)
        _, spliced[name] = model.generate_with_cache(ids, fwd_hooks=hooks, **kwargs)
    # the SAE's own reshaping and our flattening are the same rearrangement of the same values
    assert torch.equal(
        spliced["flat"].get(Z_HOOK, canvas=0, step=0), spliced["reshaping"].get(Z_HOOK, canvas=0, step=0)
    )
    torch.testing.assert_close(spliced["flat"].get(Z_HOOK, canvas=0, step=0), expected)
    # with the error term and no edit the site keeps its value
    with_error = sae_hooks(flat_sae, Z_HOOK, steps=[0], use_error_term=True)
    _, kept = model.generate_with_cache(ids, fwd_hooks=with_error, **kwargs)
    assert torch.equal(kept.get(Z_HOOK, canvas=0, step=0), z)
    per_head = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=d_head, d_sae=8))
    with pytest.raises(ValueError, match=f"d_in={d_head} values but {Z_HOOK} has {heads * d_head}"):
        sae_hooks(per_head, Z_HOOK, model=model)
    with pytest.raises(ValueError, match=r"\[batch, head, query, key\]"):
        sae_hooks(per_head, "decoder.blocks.2.attn.hook_pattern", model=model)


@pytest.mark.parametrize(
    ("architecture", "settings", "inference_class"),
    [
        ("topk", {"k": 4}, "TopKSAE"),
        ("jumprelu", {"l0_coefficient": 0.5}, "JumpReLUSAE"),
        ("batchtopk", {"k": 4}, "JumpReLUSAE"),
    ],
)
def test_train_sae_passes_architecture_and_settings_to_sae_lens(
    trained, tmp_path, architecture, settings, inference_class
):
    store = trained[0]
    checkpoints = tmp_path / "checkpoints"
    sae = train_sae(
        store, HOOK, d_sae=32, architecture=architecture, training_samples=1024, batch_size=256, lr=3e-3,
        out=tmp_path / "sae", progress=False, trainer={"n_checkpoints": 1, "checkpoint_path": str(checkpoints)},
        **settings,
    )  # fmt: skip
    assert type(sae).__name__ == inference_class
    reloaded = sae_lens.SAE.load_from_disk(tmp_path / "sae")
    assert type(reloaded).__name__ == inference_class and reloaded.cfg.metadata.hook_name == HOOK
    assert any(checkpoints.rglob("*.safetensors"))  # the trainer setting reached SAETrainer
    if architecture == "topk":
        acts = sae.encode(store.activations(HOOK)[:64])
        assert bool(((acts > 0).sum(-1) <= 4).all()) and int((acts > 0).sum(-1).max()) == 4


def test_train_sae_refuses_unknown_settings(trained):
    store = trained[0]
    with pytest.raises(ValueError, match="architecture must be one of"):
        train_sae(store, HOOK, d_sae=8, architecture="gated", progress=False)
    with pytest.raises(ValueError, match=r"\['l1_coefficient'\] are not settings of architecture 'topk'"):
        train_sae(store, HOOK, d_sae=8, architecture="topk", l1_coefficient=1.0, progress=False)
    with pytest.raises(ValueError, match="lr="):
        train_sae(store, HOOK, d_sae=8, trainer={"lr": 1.0}, progress=False)
    with pytest.raises(ValueError, match=r"\['adam_beta3'\] are not settings of the trainer"):
        train_sae(store, HOOK, d_sae=8, trainer={"adam_beta3": 0.9}, progress=False)
