"""HookedGemma4CausalLM against transformers' Gemma4ForCausalLM, built in each test with every tensor of
its state dict randomised (norms and layer scalars around 1, config-derived buffers as built).

On CPU in fp32 the logits are bit-identical (`torch.equal`) and greedy generation is token-identical.
"""

from __future__ import annotations

import pytest
import torch
from reference import CONFIGS
from transformers import AutoModelForCausalLM, Gemma4ForCausalLM, Gemma4TextConfig

from diffusionlens import HookedDiffusionGemma, HookedGemma4CausalLM
from diffusionlens.causal_lm import REQUIRED_FLAGS, causal_config_from_hf, causal_config_to_hf
from diffusionlens.toy import checkpoint_path
from diffusionlens.toy.tasks import Example
from diffusionlens.toy.tokenizer import build_tokenizer
from diffusionlens.toy.train import toy_config
from diffusionlens.toy.train_ar import IGNORE, make_ar_batch
from diffusionlens.weights.checkpoint import CheckpointError


def text_config(name: str) -> Gemma4TextConfig:
    if name == "toy":  # the shape of the shipped diffusion toy
        return Gemma4TextConfig(**causal_config_to_hf(toy_config()))
    return Gemma4TextConfig(**CONFIGS[name], final_logit_softcapping=30.0, **REQUIRED_FLAGS)


def build_reference(name: str, seed: int = 0) -> Gemma4ForCausalLM:
    torch.manual_seed(seed)
    model = Gemma4ForCausalLM(text_config(name)).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for key, tensor in model.state_dict(keep_vars=True).items():
            if not tensor.is_floating_point() or key.endswith(("embed_scale", "inv_freq")):
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if "norm" in key or "layer_scalar" in key or key.endswith("scale"):
                tensor.copy_(1.0 + 0.3 * noise)
            else:
                tensor.copy_(0.2 * noise)
    return model


@pytest.fixture(scope="module", params=["toy", "mixed", "single_kv"])
def pair(request):
    reference = build_reference(request.param)
    return reference, HookedGemma4CausalLM.from_pretrained(reference)


def prompt_ids(reference: Gemma4ForCausalLM, batch: int, length: int, seed: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, reference.config.vocab_size, (batch, length), generator=generator)


def test_logits_bit_identical(pair):
    reference, ours = pair
    # Longer than twice the sliding window, so sliding layers mask out early keys.
    ids = prompt_ids(reference, 2, 2 * reference.config.sliding_window + 3)
    with torch.no_grad():
        expected = reference(ids).logits
        logits = ours(ids)
    assert logits.shape == expected.shape
    assert torch.equal(logits, expected), float((logits - expected).abs().max())


def test_logits_bit_identical_with_padding_mask(pair):
    reference, ours = pair
    ids = prompt_ids(reference, 2, 11)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits
        logits = ours(ids, attention_mask=mask)
    assert torch.equal(logits[0], expected[0])
    assert torch.equal(logits[1, 4:], expected[1, 4:])


def test_greedy_generation_token_identical(pair):
    reference, ours = pair
    ids = prompt_ids(reference, 2, 5)
    new = 3 * reference.config.sliding_window  # past the window, so the cache drops keys
    expected = reference.generate(ids, max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    tokens = ours.generate(ids, new, eos_token_id=[])
    assert torch.equal(tokens, expected)
    # Now stop on a token row 0 produced early: row 0 finishes, row 1 goes on with pads after its eos.
    eos = int(expected[0, ids.shape[1] + 2])
    expected = reference.generate(ids, max_new_tokens=new, do_sample=False, eos_token_id=eos, pad_token_id=0)
    tokens = ours.generate(ids, new, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(tokens, expected)


def test_hooks_cache_and_logit_lens(pair):
    _, ours = pair
    n_layers = ours.cfg.num_hidden_layers
    ids = prompt_ids(pair[0], 1, 9)
    logits, cache = ours.run_with_cache(ids)
    for layer in range(n_layers):
        assert cache[f"causal.blocks.{layer}.hook_resid_post"].shape == (1, 9, ours.cfg.hidden_size)
        assert f"causal.blocks.{layer}.moe.hook_expert_indices" in cache
    assert torch.equal(cache["hook_logits"], logits)
    lens = cache.logit_lens(stack="causal")
    assert lens.shape == (n_layers + 1, 1, 9, ours.cfg.vocab_size)
    torch.testing.assert_close(lens[-1], logits)
    # An intervention through the same hook machinery changes the output, and only downstream of it.
    ablated = ours.run_with_hooks(ids, fwd_hooks=[("causal.blocks.0.hook_attn_out", lambda x, hook: x * 0)])
    assert not torch.allclose(ablated, logits)
    assert not ours.has_hooks


def test_generate_hook_context_per_token(pair):
    reference, ours = pair
    ids = prompt_ids(reference, 1, 6)
    seen: list[tuple[int, int]] = []
    with ours.hooks(fwd_hooks=[("hook_logits", lambda x, hook: seen.append((hook.ctx.step, x.shape[1])))]):
        tokens = ours.generate(ids, 7, eos_token_id=[])
    assert seen == [(0, 6)] + [(k, 1) for k in range(1, 7)]
    assert ours.hook_ctx.step is None
    tokens_again, caches = ours.generate_with_cache(
        ids, 7, names_filter="causal.blocks.*.hook_resid_post", eos_token_id=[]
    )
    assert torch.equal(tokens, tokens_again)
    assert len(caches) == 7
    assert caches[0][f"causal.blocks.{ours.cfg.num_hidden_layers - 1}.hook_resid_post"].shape[1] == 6
    assert caches[3]["causal.blocks.0.hook_resid_post"].shape[1] == 1


def test_save_pretrained_round_trip(pair, tmp_path):
    reference, ours = pair
    ours.save_pretrained(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "Gemma4ForCausalLM"
    reloaded = HookedGemma4CausalLM.from_pretrained(tmp_path, progress=False)
    ids = prompt_ids(reference, 2, 8)
    with torch.no_grad():
        expected = reference(ids).logits
        assert torch.equal(hf(ids).logits, expected)
    assert torch.equal(reloaded(ids), expected)


def test_each_class_refuses_the_other_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="HookedDiffusionGemma"):
        HookedGemma4CausalLM.from_pretrained(checkpoint_path("toy"))
    HookedGemma4CausalLM.from_pretrained(build_reference("mixed")).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="HookedGemma4CausalLM"):
        HookedDiffusionGemma.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="HookedGemma4CausalLM"):
        HookedDiffusionGemma.from_pretrained(build_reference("mixed"))


@pytest.mark.parametrize("flag", sorted(REQUIRED_FLAGS))
def test_other_gemma4_blocks_are_refused(flag):
    config = text_config("mixed").to_dict()
    config[flag] = 64 if flag == "hidden_size_per_layer_input" else (not REQUIRED_FLAGS[flag] or 2)
    with pytest.raises(CheckpointError, match=flag):
        causal_config_from_hf(config)


def test_ar_batch_supervises_answer_and_eos_only():
    tokenizer = build_tokenizer()
    batch = make_ar_batch(tokenizer, [Example("addition", "12+5=", "17"), Example("sort", "sort 3 1:", "1 3")])
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids[0, :9].tolist() == tokenizer("12+5=")["input_ids"] + tokenizer.convert_tokens_to_ids(["1", "7"]) + [1]
    supervised = labels[0] != IGNORE
    # position t predicts token t + 1: the answer "17" and eos, nothing in the prompt or padding
    assert labels[0][supervised].tolist() == ids[0, 6:9].tolist()
    assert supervised.nonzero().flatten().tolist() == [5, 6, 7]
    assert (labels[0, 8:] == IGNORE).all() and (ids[0, 9:] == 0).all()


def test_shipped_twin_loads_in_transformers_as_it_is(capsys):
    from transformers import AutoTokenizer

    from diffusionlens.toy.evaluate import main as evaluate_main

    path = checkpoint_path("toy-ar")
    assert sum(f.stat().st_size for f in path.iterdir()) <= 20 * 2**20
    assert not list(path.glob("*.bin")) and not list(path.glob("*.pt"))
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ours = HookedGemma4CausalLM.from_pretrained("toy-ar")
    assert ours.cfg == causal_config_from_hf(hf.config)
    ids = torch.tensor([tokenizer("reverse 7 2 4:")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(ours(ids), hf(ids).logits)
    expected = hf.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(ours.generate(ids, 12), expected)
    evaluate_main(["--model", "toy-ar", "--n", "2"])
    table = capsys.readouterr().out
    assert all(f"| {task} | 2 |" in table for task in ("addition", "squares", "sort", "reverse"))


def test_evaluate_lists_exactly_the_problems_the_twin_gets_wrong(capsys):
    from diffusionlens.toy.evaluate import main as evaluate_main
    from diffusionlens.toy.tasks import make_dataset
    from diffusionlens.toy.tokenizer import decode_canvas, encode_prompt
    from diffusionlens.toy.twin import evaluate_ar

    twin = HookedGemma4CausalLM.from_pretrained("toy-ar")
    score = evaluate_ar(twin, tasks=["squares"], n=80, seed=12345)["squares"]
    data = make_dataset("squares", 80, seed=12345, split="eval")
    expected = []
    for prompt, answer in zip(data.prompts, data.answers, strict=True):  # one at a time, unbatched
        ids = torch.tensor([encode_prompt(twin.tokenizer, prompt)])
        output = decode_canvas(twin.tokenizer, twin.generate(ids, 48)[0, ids.shape[1] :].tolist())
        if output != answer:
            expected.append((prompt, output, answer))
    assert expected, "the twin got every problem right: the test lost its power"
    assert [(w.prompt, w.output, w.answer) for w in score.wrong] == expected
    assert score.exact_match == (80 - len(expected)) / 80
    evaluate_main(["--model", "toy-ar", "--n", "80", "--errors"])
    printed = capsys.readouterr().out
    assert f"squares: {len(expected)} wrong of 80" in printed
    assert f"  {expected[0][0]} -> {expected[0][1]!r} (answer: {expected[0][2]!r})" in printed
