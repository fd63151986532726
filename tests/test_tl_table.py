"""Every row of docs/coming_from_transformerlens.md runs: the rows live here, and a test checks the
page's table says the same, so the page and the tested code cannot drift apart."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from diffusionlens import HookedDiffusionGemma, ReplayNoise

PAGE = Path(__file__).parents[1] / "docs" / "coming_from_transformerlens.md"

# (task, TransformerLens, ours). `ours` runs as written with: model (the toy), ids (a prompt),
# canvas (a canvas of ids), fn (a hook function), cache (from run_with_cache), steps.
ROWS = [
    ("load a model", "HookedTransformer.from_pretrained(name)", "HookedDiffusionGemma.from_pretrained('toy')"),
    ("list hook points", "model.hook_dict", "model.hook_dict"),
    (
        "run with temporary hooks",
        "model.run_with_hooks(x, fwd_hooks=[(name, fn)])",
        "model.run_with_hooks(ids, canvas, fwd_hooks=[('decoder.blocks.0.hook_resid_post', fn)])",
    ),
    ("add a hook", "model.add_hook(name, fn)", "model.add_hook('decoder.hook_embed', fn)"),
    ("permanent hook", "model.add_perma_hook(name, fn)", "model.add_perma_hook('decoder.hook_embed', fn)"),
    ("remove hooks", "model.reset_hooks(including_permanent=True)", "model.reset_hooks(including_permanent=True)"),
    (
        "hooks as a context",
        "with model.hooks(fwd_hooks=[(name, fn)]): model(x)",
        "with model.hooks(fwd_hooks=[('decoder.hook_embed', fn)]): model(ids, canvas)",
    ),
    (
        "per-hook state",
        "hook.ctx['x'] = ...",
        "model.run_with_hooks(ids, canvas, fwd_hooks=[('decoder.hook_embed', "
        "lambda x, hook: hook.ctx.update(seen=hook.ctx.step))])",
    ),
    (
        "one pass with a cache",
        "logits, cache = model.run_with_cache(tokens)",
        "logits, cache = model.run_with_cache(ids, canvas)",
    ),
    ("read a value", "cache['blocks.3.hook_resid_post']", "cache['decoder.blocks.3.hook_resid_post']"),
    ("tuple keys", "cache['resid_post', 3]", "cache['resid_post', 3]; cache['resid_post', 3, 'encoder']"),
    (
        "short names",
        "utils.get_act_name('pattern', 2)",
        "diffusionlens.utils.get_act_name('pattern', 2, stack='decoder')",
    ),
    ("iterate a cache", "cache.keys(), cache.items()", "list(cache.keys()); dict(cache.items())"),
    (
        "drop the batch axis",
        "model.run_with_cache(tokens, remove_batch_dim=True)",
        "model.run_with_cache(ids, canvas, remove_batch_dim=True)",
    ),
    (
        "keep some positions",
        "model.run_with_cache(tokens, pos_slice=-1)",
        "model.run_with_cache(ids, canvas, pos_slice=-1)",
    ),
    (
        "residual stream so far",
        "cache.accumulated_resid(layer=3, incl_mid=True, return_labels=True)",
        "cache.accumulated_resid(layer=3, incl_mid=True, return_labels=True)",
    ),
    ("residual components", "cache.decompose_resid(return_labels=True)", "cache.decompose_resid(return_labels=True)"),
    ("logit lens", "cache.accumulated_resid(apply_ln=True) @ W_U", "cache.logit_lens()"),
    (
        "gradients",
        "model.run_with_cache(tokens, incl_bwd=True)",
        "model.run_with_cache(ids, canvas, incl_bwd=True, loss_fn=lambda logits: logits[0, 3, 5])",
    ),
    ("move a cache", "cache.to('cpu')", "cache.to('cpu')"),
    ("tokenise", "model.to_tokens(text)", "model.to_tokens('squares 4 8:')"),
    ("tokens as strings", "model.to_str_tokens(text)", "model.to_str_tokens('squares 4 8:')"),
    ("one token's id", "model.to_single_token(s)", "model.to_single_token('4')"),
    ("where a token sits", "model.get_token_position(tok, input)", "model.get_token_position('4', 'squares 4 8:')"),
    ("ids to text", "model.to_string(tokens)", "model.to_string(ids[0])"),
    ("loss of a pass", "model(tokens, return_type='loss')", "model(ids, canvas, return_type='loss', targets=canvas)"),
    ("stop at a layer", "model(tokens, stop_at_layer=l)", "model(ids, canvas, stop_at_layer=2)"),
    (
        "resume from a residual",
        "model(resid, start_at_layer=l)",
        "model.denoise(cache['resid_pre', 2], model.encode(ids), start_at_layer=2)",
    ),
    ("weights", "model.W_Q[l]", "block_weights(model, 2).W_Q"),
    ("QK / OV circuits", "model.OV[l] (FactoredMatrix)", "block_weights(model, 2).OV"),
    ("generate", "model.generate(tokens)", "model.generate(ids, noise=ReplayNoise(0), progress=False)"),
    (
        "a generation with a cache",
        "—",
        "model.generate_with_cache(ids, names_filter='decoder.hook_logits', steps=steps, progress=False)",
    ),
    ("logit lens at a step", "—", "model.generate_with_cache(ids, steps=[0], progress=False)[1].logit_lens(step=0)"),
]

_CELL = re.compile(r"^\| (?P<task>[^|]+) \| `(?P<tl>.*)` \| `(?P<ours>.*)` \|$")


def table_rows(text: str) -> list[tuple[str, str, str]]:
    rows = []
    for line in text.splitlines():
        if (match := _CELL.match(line.replace("`—`", "`—`"))) is not None:
            rows.append((match["task"].strip(), match["tl"], match["ours"]))
    return rows


def markdown_table() -> str:
    """The table the page carries, generated from ROWS (paste it when a row changes)."""
    lines = ["| task | TransformerLens | diffusionlens |", "|---|---|---|"]
    lines += [f"| {task} | `{tl}` | `{ours}` |" for task, tl, ours in ROWS]
    return "\n".join(lines)


def test_page_table_matches_the_tested_rows():
    assert markdown_table() in PAGE.read_text(), "regenerate the table with tests/test_tl_table.py:markdown_table()"
    assert table_rows(PAGE.read_text()) == ROWS


@pytest.fixture(scope="module")
def namespace():
    import diffusionlens
    from diffusionlens import block_weights

    model = HookedDiffusionGemma.from_pretrained("toy", progress=False)
    ids = model.to_tokens("squares 4 8:")
    canvas = torch.randint(
        0, model.cfg.vocab_size, (1, model.cfg.canvas_length), generator=torch.Generator().manual_seed(0)
    )
    _, cache = model.run_with_cache(ids, canvas)
    return dict(
        model=model,
        ids=ids,
        canvas=canvas,
        cache=cache,
        diffusionlens=diffusionlens,
        block_weights=block_weights,
        HookedDiffusionGemma=HookedDiffusionGemma,
        fn=lambda x, hook: None,
        steps=[0, 1],
        ReplayNoise=ReplayNoise,
    )


@pytest.mark.parametrize(("task", "tl", "ours"), ROWS, ids=[row[0] for row in ROWS])
def test_row_runs(namespace, task, tl, ours):
    model = namespace["model"]
    try:
        with torch.no_grad() if "incl_bwd" not in ours else torch.enable_grad():
            exec(compile(ours, f"coming_from_transformerlens: {task}", "exec"), dict(namespace))
    finally:
        model.reset_hooks(including_permanent=True)
