"""Port of TransformerLens's tests/integration/test_prepend_bos.py (TransformerLensOrg/TransformerLens at
commit 4cd36aaeb5dad931d085bd5d46a12b402fe15272), assertions unchanged.

Adaptations: gpt2 / opt-125m become the shipped toy model (a character-level tokenizer, so TL's prompts
tokenise too); `model.cfg.default_prepend_bos` is `model.default_prepend_bos`, and TL's
`from_pretrained(..., default_prepend_bos=False)` sets it after loading. Its default here is None, "as the
tokenizer does by itself", which for Gemma's tokenizers and the toy's prepends `<bos>`: the first test
accepts None for TL's True and checks the bos as TL does. The model's forward takes ids, not text, so TL's
`logits.shape[1]` (one logit per prompt token) reads the number of prompt positions the encoder saw,
`model.encode(tokens).length`. TL's tokenizer without bos is `tokenizer(prompt, add_special_tokens=False)`.
TL sets `tokenizer.padding_side = "right"`; here that is `model.default_padding_side`. `get_token_position`
raises ValueError where TL asserts.
"""

import pytest
import torch

from diffusionlens import HookedDiffusionGemma


def load_toy():
    return HookedDiffusionGemma.from_pretrained("toy", progress=False)


def prompt_positions(model, prompt, prepend_bos=None):
    with torch.no_grad():
        return model.encode(model.to_tokens(prompt, prepend_bos=prepend_bos)).length


@pytest.fixture(scope="module")
def model():
    return load_toy()


class TestPrependBos:
    prompt = "Hello world!"

    # helper functions
    def get_num_tokens_in_prompt(self, model, prompt, intended_prepend_bos):
        tokens = model.tokenizer(prompt, add_special_tokens=False)["input_ids"]

        return len(tokens) + int(intended_prepend_bos)

    def check_first_token(self, model, str_tokens, tokens, intended_prepend_bos):
        if intended_prepend_bos:
            assert str_tokens[0] == model.tokenizer.bos_token
            assert tokens[0][0] == model.tokenizer.bos_token_id
        else:
            assert str_tokens[0] != model.tokenizer.bos_token
            assert tokens[0][0] != model.tokenizer.bos_token_id

    def check_tokens_length(self, model, n_positions, str_tokens, tokens, intended_prepend_bos):
        expected_num_tokens = self.get_num_tokens_in_prompt(model, self.prompt, intended_prepend_bos)
        assert n_positions == len(str_tokens) == tokens.shape[1] == expected_num_tokens

    # tests
    def test_default_prepend_bos(self):
        intended_prepend_bos = True

        model = load_toy()
        assert model.default_prepend_bos in (None, intended_prepend_bos), "Default prepend_bos should be True"

        n_positions = prompt_positions(model, self.prompt)
        str_tokens = model.to_str_tokens(self.prompt)
        tokens = model.to_tokens(self.prompt)  # [batch pos]

        self.check_first_token(model, str_tokens, tokens, intended_prepend_bos)
        self.check_tokens_length(model, n_positions, str_tokens, tokens, intended_prepend_bos)

        bos_position = model.get_token_position(model.tokenizer.bos_token_id, self.prompt)
        assert bos_position == 0

    def test_default_prepend_bos_to_false(self):
        intended_prepend_bos = False

        model = load_toy()
        model.default_prepend_bos = intended_prepend_bos

        n_positions = prompt_positions(model, self.prompt)
        str_tokens = model.to_str_tokens(self.prompt)
        tokens = model.to_tokens(self.prompt)

        self.check_first_token(model, str_tokens, tokens, intended_prepend_bos)
        self.check_tokens_length(model, n_positions, str_tokens, tokens, intended_prepend_bos)

    @pytest.mark.parametrize("intended_prepend_bos", [True, False])
    def test_override_prepend_bos(self, model, intended_prepend_bos):
        for default_prepend_bos in [True, False]:
            model.default_prepend_bos = default_prepend_bos

            n_positions = prompt_positions(model, self.prompt, prepend_bos=intended_prepend_bos)
            str_tokens = model.to_str_tokens(self.prompt, prepend_bos=intended_prepend_bos)
            tokens = model.to_tokens(self.prompt, prepend_bos=intended_prepend_bos)

            self.check_first_token(model, str_tokens, tokens, intended_prepend_bos)
            self.check_tokens_length(model, n_positions, str_tokens, tokens, intended_prepend_bos)

    def test_prepend_bos_with_get_token_position(self):
        model = load_toy()

        bos_position = model.get_token_position(model.tokenizer.bos_token_id, self.prompt)
        assert bos_position == 0

        with pytest.raises(ValueError):
            bos_position = model.get_token_position(model.tokenizer.bos_token_id, self.prompt, prepend_bos=False)

        model.default_prepend_bos = False
        with pytest.raises(ValueError):
            bos_position = model.get_token_position(model.tokenizer.bos_token_id, self.prompt)

        bos_position = model.get_token_position(model.tokenizer.bos_token_id, self.prompt, prepend_bos=True)
        assert bos_position == 0

    def test_same_tokenization(self, model):
        prompt = self.prompt
        prompts = [
            "Italy is in Europe.",
            "Pyeongchang Olympics was held in 2018",
            "2023-09-09",
            "287594812673495",
        ]

        model.default_padding_side = "right"

        for input in [prompt, prompts]:
            tokens_with_bos = model.to_tokens(input, prepend_bos=True)
            tokens_without_bos = model.to_tokens(input, prepend_bos=False)
            assert tokens_with_bos[..., 1:].equal(tokens_without_bos)

            str_tokens_with_bos = model.to_str_tokens(input, prepend_bos=True)
            str_tokens_without_bos = model.to_str_tokens(input, prepend_bos=False)

            if isinstance(str_tokens_with_bos[0], list):
                for i in range(len(str_tokens_with_bos)):
                    assert str_tokens_with_bos[i][1:] == str_tokens_without_bos[i]
            else:
                assert str_tokens_with_bos[1:] == str_tokens_without_bos
