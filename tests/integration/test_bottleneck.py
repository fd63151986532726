"""The token bottleneck: what it keeps, renormalisation, and generate/hook equivalence."""

from __future__ import annotations

import pytest
import torch
from reference import CANVAS, build_pair

from diffusionlens import ReplayNoise, TokenBottleneck


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert TokenBottleneck(top_k=2).keep_mask(logits).tolist() == [[True, True, False, False]]
    assert TokenBottleneck(top_p=0.5).keep_mask(logits).tolist() == [[True, False, False, False]]
    assert TokenBottleneck(top_p=0.79).keep_mask(logits).tolist() == [[True, True, False, False]]
    assert TokenBottleneck(top_p=0.81).keep_mask(logits).tolist() == [[True, True, True, False]]
    assert TokenBottleneck(top_k=1, top_p=0.9).keep_mask(logits).tolist() == [[True, False, False, False]]
    probs = torch.softmax(TokenBottleneck(top_k=2)(logits), -1)
    assert torch.allclose(probs, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    assert probs[0, 2:].eq(0).all()


@pytest.mark.parametrize("bad", [dict(), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)])
def test_invalid_settings(bad):
    with pytest.raises(ValueError):
        TokenBottleneck(**bad)


def test_generate_option_equals_the_hook_and_changes_the_run():
    _, model = build_pair("mixed", seed=2)
    ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=CANVAS["mixed"] * 2, max_denoising_steps=6, noise=ReplayNoise(0), progress=False)
    bottleneck = TokenBottleneck(top_k=2)
    seen = []
    record = [("decoder.self_cond.hook_logits_in", lambda x, h: seen.append(x.clone()))]
    via_option = model.generate(ids, bottleneck=bottleneck, fwd_hooks=record, **kw)
    assert all(bool((torch.softmax(x.float(), -1) > 0).sum(-1).le(2).all()) for x in seen)
    via_hook = model.generate(ids, fwd_hooks=[("decoder.self_cond.hook_logits_in", bottleneck.hook)], **kw)
    assert torch.equal(via_option.sequences, via_hook.sequences)
    assert not torch.equal(via_option.sequences, model.generate(ids, **kw).sequences)


def test_full_width_bottleneck_is_the_identity_and_top1_is_the_argmax_embedding():
    _, model = build_pair("mixed", seed=2)
    ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=CANVAS["mixed"] * 2, max_denoising_steps=6, noise=ReplayNoise(0), progress=False)
    plain = model.generate(ids, **kw)
    full = model.generate(ids, bottleneck=TokenBottleneck(top_k=model.cfg.vocab_size), **kw)
    assert torch.equal(plain.sequences, full.sequences)

    seen: dict[tuple, torch.Tensor] = {}

    def grab(name):
        def record(x, hook):
            seen[(name, hook.ctx.canvas, hook.ctx.step)] = x.clone()

        return record

    names = ("decoder.self_cond.hook_logits_in", "decoder.self_cond.hook_soft_embed")
    model.generate(ids, bottleneck=TokenBottleneck(top_k=1), fwd_hooks=[(n, grab(n)) for n in names], **kw)
    checked = 0
    for (name, canvas, step), logits_in in seen.items():
        if name == names[0]:
            expected = model.decoder.embed(logits_in.argmax(-1))  # E[argmax] × √d
            assert torch.equal(seen[(names[1], canvas, step)], expected)
            checked += 1
    assert checked >= 2


def test_docs_bottleneck_table_matches_the_harness():
    """Re-run two rows of the table in docs/variable_transparency.md for one task and compare."""
    from pathlib import Path

    from diffusionlens import HookedDiffusionGemma
    from diffusionlens.toy.evaluate import evaluate

    doc = (Path(__file__).parents[2] / "docs" / "variable_transparency.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in doc.splitlines() if line.startswith("| ")}
    header = [c.strip() for c in rows["self-conditioning"].split("|")[1:-1]]
    column = header.index("reverse")
    model = HookedDiffusionGemma.from_pretrained("toy", progress=False)
    for label, bottleneck in (("full logits", None), ("TokenBottleneck(top_k=1)", TokenBottleneck(top_k=1))):
        shown = rows[label].split("|")[1:-1][column].strip()
        score = evaluate(model, tasks=["reverse"], n=100, seed=12345, bottleneck=bottleneck)["reverse"]
        assert f"{100 * score.exact_match:.1f}%" == shown, label
