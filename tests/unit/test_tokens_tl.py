"""TransformerLens-style token helpers, and chat-template output flowing into generate."""

from __future__ import annotations

import pytest
import torch

from diffusionlens import HookedDiffusionGemma, ReplayNoise
from diffusionlens.toy.tokenizer import BOS_ID, PAD_ID

# A small Jinja template over the toy's characters: "<bos>u:<content> " per user turn, then "a:".
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}a:{% endif %}"
)


@pytest.fixture(scope="module")
def toy():
    model = HookedDiffusionGemma.from_pretrained("toy", progress=False)
    model.tokenizer.chat_template = CHAT_TEMPLATE
    return model


def ids_of(tokenizer, text):
    return tokenizer.convert_tokens_to_ids(list(text))


def test_to_tokens_default_is_unchanged_and_prepend_bos_padding_side(toy):
    tok = toy.tokenizer
    plain = toy.to_tokens(["1+2=", "10+20="])
    assert plain[0].tolist() == [PAD_ID, PAD_ID, BOS_ID, *ids_of(tok, "1+2=")]  # left padded, tokenizer's bos
    assert plain[1].tolist() == tok("10+20=")["input_ids"]
    assert toy.to_tokens("1+2=", prepend_bos=False)[0].tolist() == ids_of(tok, "1+2=")
    assert toy.to_tokens("1+2=", prepend_bos=True)[0].tolist() == [BOS_ID, *ids_of(tok, "1+2=")]  # one bos, not two
    ids, mask = toy.to_tokens_and_mask(["1+2=", "10+20="], padding_side="right")
    assert ids[0].tolist() == [BOS_ID, *ids_of(tok, "1+2="), PAD_ID, PAD_ID]
    assert mask[0].tolist() == [1, 1, 1, 1, 1, 0, 0]
    with pytest.raises(ValueError, match="padding_side"):
        toy.to_tokens("1+2=", padding_side="middle")


def test_to_str_tokens_single_token_and_position(toy):
    assert toy.to_str_tokens("1+1=") == ["<bos>", "1", "+", "1", "="]
    assert toy.to_str_tokens("1+1=", prepend_bos=False) == ["1", "+", "1", "="]
    assert toy.to_str_tokens(["1", "22"]) == [["<bos>", "1"], ["<bos>", "2", "2"]]
    assert toy.to_str_tokens(toy.to_tokens(["1", "22"])) == [["<pad>", "<bos>", "1"], ["<bos>", "2", "2"]]
    assert toy.to_single_token("+") == toy.tokenizer.convert_tokens_to_ids("+")
    with pytest.raises(ValueError, match="is 2 tokens"):
        toy.to_single_token("12")
    # TL meanings: positions index the tokenised input, bos included unless prepend_bos=False.
    assert toy.get_token_position("1", "1+1=") == 1
    assert toy.get_token_position("1", "1+1=", mode="last") == 3
    assert toy.get_token_position("1", "1+1=", prepend_bos=False) == 0
    assert toy.get_token_position(BOS_ID, toy.to_tokens("1+1=")) == 0
    with pytest.raises(ValueError, match="does not occur"):
        toy.get_token_position("9", "1+1=")
    with pytest.raises(ValueError, match="mode"):
        toy.get_token_position("1", "1+1=", mode="middle")


def test_chat_template_output_flows_into_generate(toy):
    tok = toy.tokenizer
    conversations = [
        [{"role": "user", "content": "12+30="}],
        [
            {"role": "user", "content": "sort 3 1 2"},
            {"role": "assistant", "content": "1 2 3"},
            {"role": "user", "content": "7+8="},
        ],
    ]
    # The equivalent prompts tokenised by hand: bos, the characters, left padding.
    texts = ["u:12+30= a:", "u:sort 3 1 2 a:1 2 3 u:7+8= a:"]
    rows = [[BOS_ID, *ids_of(tok, text)] for text in texts]
    width = max(map(len, rows))
    manual_ids = torch.tensor([[PAD_ID] * (width - len(r)) + r for r in rows])
    manual_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])

    def run(ids, mask):
        return toy.generate(
            ids, attention_mask=mask, noise=ReplayNoise(0), max_new_tokens=48, max_denoising_steps=8, progress=False
        )

    expected = run(manual_ids, manual_mask).sequences
    # chat= messages, the template's BatchEncoding (right-padded by the tokenizer's batch call:
    # re-padded left), its tensor form for one conversation, and its string form.
    for ids, mask in (
        toy.to_tokens_and_mask(chat=conversations),
        toy.to_tokens_and_mask(tok.apply_chat_template(conversations, add_generation_prompt=True, padding=True,
                                                       padding_side="right", return_tensors="pt")),
        toy.to_tokens_and_mask([tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
                                for c in conversations], prepend_bos=False),
    ):  # fmt: skip
        assert torch.equal(ids, manual_ids) and torch.equal(mask, manual_mask)
        assert torch.equal(run(ids, mask).sequences, expected)
    single = tok.apply_chat_template(conversations[0], add_generation_prompt=True, return_tensors="pt")
    ids, mask = toy.to_tokens_and_mask(single)
    assert ids[0].tolist() == rows[0] and mask.all()


def test_bad_token_inputs_name_the_fix(toy):
    with pytest.raises(ValueError, match="exactly one"):
        toy.to_tokens_and_mask("1+2=", chat=[{"role": "user", "content": "1+2="}])
    with pytest.raises(ValueError, match="prepend_bos applies to text"):
        toy.to_tokens_and_mask(torch.tensor([[2, 5, 6]]), prepend_bos=True)
    with pytest.raises(ValueError, match="padding between tokens"):
        toy.to_tokens_and_mask({"input_ids": [[2, 5, 6]], "attention_mask": [[1, 0, 1]]})
    template, toy.tokenizer.chat_template = toy.tokenizer.chat_template, None
    try:
        with pytest.raises(ValueError, match="no chat_template"):
            toy.to_tokens_and_mask(chat=[{"role": "user", "content": "1+2="}])
    finally:
        toy.tokenizer.chat_template = template


def test_docs_chat_template_example_runs(capsys):
    import re
    from pathlib import Path

    page = (Path(__file__).parents[2] / "docs" / "forward_and_tokens.md").read_text()
    snippet = re.findall(r"```python\n(.*?)```", page, flags=re.S)[-1]
    exec(compile(snippet, "forward_and_tokens.md", "exec"), {})
    assert "'a', ':'] -> " in capsys.readouterr().out
