"""The shipped toy checkpoint: loads in ours and in transformers, generates identically, demo runs."""

from __future__ import annotations

import torch
from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

import diffusionlens.toy
from diffusionlens import HookedDiffusionGemma
from diffusionlens.cli import main as cli_main
from diffusionlens.toy import decode_canvas


def test_shipped_checkpoint_is_small_and_loads_by_alias():
    path = diffusionlens.toy.checkpoint_path()
    assert (path / "model.safetensors").stat().st_size <= 20 * 2**20
    by_path = HookedDiffusionGemma.from_pretrained(path, progress=False)
    by_alias = HookedDiffusionGemma.from_pretrained("toy", progress=False)
    ids = by_alias.to_tokens("squares 400 800:")
    canvas = torch.randint(0, by_alias.cfg.vocab_size, (1, by_alias.cfg.canvas_length))
    assert torch.equal(by_path(ids, canvas), by_alias(ids, canvas))


def test_transformers_loads_it_and_generates_the_same_tokens():
    path = diffusionlens.toy.checkpoint_path()
    ours = HookedDiffusionGemma.from_pretrained(path, progress=False)
    reference = DiffusionGemmaForBlockDiffusion.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = ["squares 400 800:", "347+589=", "sort 5 3 9 1:"]
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], ours.to_tokens(prompts))
    for seed in (0, 1):
        torch.manual_seed(seed)
        expected = reference.generate(batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=48)
        torch.manual_seed(seed)
        result = ours.generate(
            batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=48, progress=False
        )
        assert torch.equal(result.sequences, expected.sequences)
    answer = decode_canvas(tokenizer, result.sequences[0, batch["input_ids"].shape[1] :].tolist())
    assert answer and answer == tokenizer.decode(
        expected.sequences[0, batch["input_ids"].shape[1] :], skip_special_tokens=True
    )


def test_demo_shows_the_canvas_evolving(capsys):
    cli_main(["demo", "--prompt", "squares 400 800:"])
    out = capsys.readouterr().out
    assert "step  0" in out and "answer after" in out and "hook_resid_post" in out
