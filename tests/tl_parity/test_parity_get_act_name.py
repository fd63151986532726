"""The examples in TransformerLens's `get_act_name` docstring (transformer_lens/utilities/components_utils.py,
TransformerLensOrg/TransformerLens at commit 4cd36aaeb5dad931d085bd5d46a12b402fe15272), as tests.

Adaptations: full names carry the `decoder.` prefix; TL's `scale4ln1` reads the scale of `ln1_post`
(`scale4ln1_post`): the pre-norms have no scale hook here.
"""

import pytest

from diffusionlens.hooks.names import get_act_name


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda: get_act_name("k", 6, "a"), "decoder.blocks.6.attn.hook_k"),
        (lambda: get_act_name("pre", 2), "decoder.blocks.2.mlp.hook_pre"),
        (lambda: get_act_name("embed"), "decoder.hook_embed"),
        (lambda: get_act_name("normalized", 27, "ln2"), "decoder.blocks.27.ln2.hook_normalized"),
        (lambda: get_act_name("k6"), "decoder.blocks.6.attn.hook_k"),
        (lambda: get_act_name("scale4ln1_post"), "decoder.blocks.4.ln1_post.hook_scale"),
        (lambda: get_act_name("pre5"), "decoder.blocks.5.mlp.hook_pre"),
    ],
    ids=["k_6_a", "pre_2", "embed", "normalized_27_ln2", "k6", "scale4ln1", "pre5"],
)
def test_full_examples(call, expected):
    assert call() == expected


def test_shorthand_examples():
    assert get_act_name("embed") == get_act_name("embed", None, None)
    assert get_act_name("k6") == get_act_name("k", 6, None)
    assert get_act_name("scale4ln1_post") == get_act_name("scale", 4, "ln1_post")
