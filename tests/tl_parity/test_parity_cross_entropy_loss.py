"""Port of TransformerLens's tests/integration/test_cross_entropy_loss.py (TransformerLensOrg/TransformerLens at
commit 4cd36aaeb5dad931d085bd5d46a12b402fe15272), assertions unchanged.

Adaptations: the pretrained solu-1l becomes the shipped toy model; the loss is the denoising loss of one
decoder pass over a seeded canvas against itself (`model(tokens, canvas, return_type="loss", targets=canvas)`),
so the masked tokens are added to the prompt the canvas reads. TL appends them after the prompt; here they
go before it (left padding, as `generate` pads): the canvas follows the prompt's last position, so tokens
appended after the prompt, even masked, leave a gap of RoPE positions between prompt and canvas, and the
loss moves. That is one marked test.
"""

import pytest
import torch


def loss(model, tokens, canvas, **kwargs):
    with torch.no_grad():
        return model(tokens, canvas, return_type="loss", targets=canvas, **kwargs)


def combined(default_tokens, extra_tokens, default_mask, extra_mask, prompt_first):
    if prompt_first:
        return torch.cat([default_tokens, extra_tokens], dim=1), torch.cat([default_mask, extra_mask], dim=1)
    return torch.cat([extra_tokens, default_tokens], dim=1), torch.cat([extra_mask, default_mask], dim=1)


@pytest.mark.parametrize(
    "prompt_first",
    [
        False,
        pytest.param(
            True,
            marks=pytest.mark.xfail(
                strict=True,
                reason="masked tokens after the prompt shift the canvas's RoPE positions (the canvas follows the "
                "prompt's last position), as in transformers' DiffusionGemma; pad prompts on the left",
            ),
        ),
    ],
    ids=["masked_before_prompt", "masked_after_prompt_as_TL"],
)
def test_cross_entropy_attention_mask(toy_pass, prompt_first):
    """Check that adding a bunch of masked tokens to the input does not change the loss."""
    model, _, canvas = toy_pass

    # Step 1: Get the default loss on a prompt
    prompt = ["squares 4 8:"]
    default_tokens = model.to_tokens(prompt)
    default_attention_mask = torch.ones_like(default_tokens)
    default_loss = loss(model, default_tokens, canvas)
    ones_mask_loss = loss(model, default_tokens, canvas, attention_mask=default_attention_mask)
    assert torch.allclose(default_loss, ones_mask_loss, atol=1e-6)

    # Step 2: Get the loss when we add some extra tokens to the input and set their attention mask
    # to zero
    extra_prompt = ["squares 7 3 9 1:"]
    extra_tokens = model.to_tokens(extra_prompt)
    extra_zeros_attention_mask = torch.zeros_like(extra_tokens)

    combined_tokens, combined_attention_mask = combined(
        default_tokens, extra_tokens, default_attention_mask, extra_zeros_attention_mask, prompt_first
    )
    combined_masked_loss = loss(model, combined_tokens, canvas, attention_mask=combined_attention_mask)
    assert torch.allclose(default_loss, combined_masked_loss)
