"""Direct logit attribution across steps: each step's components (blocks, or heads, MLPs, neurons and
experts) sum to its pre-soft-cap logit difference, finer components sum to the block they split,
missing recordings are refused, and the figure and the viewer panel show the table."""

from __future__ import annotations

import pytest
import torch
from test_viewer import set_step

from diffusionlens import HookedDiffusionGemma, ReplayNoise
from diffusionlens.analysis import DLA_COMPONENT_NAMES, DLA_NAMES, DLA_NEURON_NAMES, DLAByStep, dla_by_step
from diffusionlens.viz import plot_dla_by_step, write_viewer

F32 = dict(atol=1e-5, rtol=1e-5)
LABELS = "return Array.from(document.querySelectorAll('th.dla-label')).map(c => c.textContent)"


def generate_with_opt_in_hooks(model, ids, names, **kwargs):
    """A generation that records `names` with `attn.hook_result` and `moe.hook_expert_out` switched on."""
    model.set_use_attn_result(True)
    model.set_use_expert_outputs(True)
    try:
        return model.generate_with_cache(ids, names_filter=names, progress=False, **kwargs)
    finally:
        model.set_use_attn_result(False)
        model.set_use_expert_outputs(False)


@pytest.fixture(scope="module")
def run():
    model = HookedDiffusionGemma.from_pretrained("toy", progress=False)
    result, cache = generate_with_opt_in_hooks(
        model,
        model.to_tokens("squares 400 800:"),
        sorted({*DLA_NAMES, *DLA_NEURON_NAMES, "decoder.hook_logits"}),
        noise=ReplayNoise(40),
    )
    return model, result, cache


def random_toy_run(name: str):
    """A random tiny model (every tensor randomised) and a 2-row generation recording every DLA hook."""
    if name == "reference":  # transformers' tiny config of tests/reference.py: grouped KV, top-2 of 4 experts
        from reference import build_pair

        model = build_pair("mixed", seed=3)[1]
    else:  # test_decomposition's config: attention biases (an L{l}_attn_bias component), top-2 of 3 experts
        from random_models import random_model

        model = random_model(torch.float32)
    cfg = model.cfg
    ids = torch.randint(3, cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(8))
    _, cache = generate_with_opt_in_hooks(
        model,
        ids,
        sorted({*DLA_NAMES, *DLA_NEURON_NAMES}),
        max_new_tokens=cfg.canvas_length,
        max_denoising_steps=3,
        noise=ReplayNoise(2),
        eos_token_id=None,
    )
    return model, cache


def logit_off_the_final_norm(model, cache, target: int, other: int | None, *, row: int, position: int):
    """`[step]`: the pre-soft-cap logit (difference) from the recorded final norm output, unembedded."""
    W_E = model.decoder.embed.W_E.detach().float()
    direction = W_E[target] - (W_E[other] if other is not None else 0.0)
    return cache["decoder.ln_final.hook_normalized"][:, row, position].float() @ direction


def assert_splits_add_up(block: DLAByStep, fine: DLAByStep, n_layers: int) -> None:
    """Each block's attention output equals its heads (and o_proj bias); its FFN output its dense MLP
    (or neurons) and experts; the embedding path its token embedding and self-conditioning signal."""
    fine_sum = lambda keep: fine.attributions[:, [i for i, x in enumerate(fine.labels) if keep(x)]].sum(-1)  # noqa: E731
    column = lambda label: block.attributions[:, block.labels.index(label)]  # noqa: E731
    torch.testing.assert_close(fine_sum(lambda x: x in ("embed", "self_cond")), column("embed"), **F32)
    for layer in range(n_layers):
        heads = fine_sum(lambda x, p=f"L{layer}": x.startswith(f"{p}H") or x == f"{p}_attn_bias")
        torch.testing.assert_close(heads, column(f"{layer}_attn_out"), **F32)
        ffn = fine_sum(lambda x, p=f"L{layer}": x.startswith((f"{p}E", f"{p}N")) or x == f"{p}_mlp")
        torch.testing.assert_close(ffn, column(f"{layer}_ffn_out"), **F32)


def test_components_sum_to_each_steps_logit_difference_before_the_softcap(run):
    model, result, cache = run
    dla = dla_by_step(cache, "8", other="7", position=0)
    assert dla.steps == list(range(result.trace.steps()))
    assert dla.attributions.shape == (len(dla.steps), 1 + 2 * model.cfg.num_hidden_layers)
    # invert the soft-cap of the logits the model returned: an independent reading of the same number
    cap = model.cfg.final_logit_softcapping
    logits = cache["decoder.hook_logits"][:, 0, 0].double()
    raw = torch.atanh(logits / cap) * cap
    expected = raw[:, model.to_single_token("8")] - raw[:, model.to_single_token("7")]
    assert torch.allclose(dla.attributions.sum(-1).double(), expected, atol=2e-3)
    assert torch.allclose(dla.attributions.sum(-1), dla.logit, atol=1e-4)
    # the draft says 7 at step 0 and 8 from step 1: the sign of the difference follows it
    assert dla.logit[0] < 0 < dla.logit[1]
    single = dla_by_step(cache, model.to_single_token("8"), position=0, steps=[1])
    assert torch.allclose(single.attributions.sum(-1), raw[1:2, model.to_single_token("8")].float(), atol=2e-3)


def test_heads_experts_and_neurons_sum_to_each_steps_logit_and_to_their_blocks(run):
    model, _, cache = run
    n_layers = model.cfg.num_hidden_layers
    block = dla_by_step(cache, "8", other="7", position=0)
    eight, seven = model.to_single_token("8"), model.to_single_token("7")
    expected = logit_off_the_final_norm(model, cache, eight, seven, row=0, position=0)
    heads = model.cfg.num_attention_heads
    per_block = heads + 1 + model.cfg.num_experts
    fine = dla_by_step(cache, "8", other="7", position=0, granularity="component")
    assert fine.granularity == "component" and fine.steps == block.steps
    assert fine.labels[: 2 + per_block] == ["embed", "self_cond", *(f"L0H{h}" for h in range(heads)), "L0_mlp"] + [
        f"L0E{e}" for e in range(model.cfg.num_experts)
    ]
    assert len(fine.labels) == 2 + n_layers * per_block
    torch.testing.assert_close(fine.attributions.sum(-1), expected, **F32)
    torch.testing.assert_close(fine.logit, expected, **F32)
    assert_splits_add_up(block, fine, n_layers)
    neurons = dla_by_step(cache, "8", other="7", position=0, granularity="component", expand_neurons=True)
    assert "L5N383" in neurons.labels and "L5_mlp" not in neurons.labels
    torch.testing.assert_close(neurons.attributions.sum(-1), expected, **F32)
    assert_splits_add_up(block, neurons, n_layers)
    # the layers a label names, and a narrowed table whose rows still sum to the logit
    assert fine.layers[:3] == [None, None, 0] and block.layers[:2] == [None, 0]
    top = fine.keep_top(5)
    assert top.labels[-1] == "rest" and len(top.labels) == 6
    torch.testing.assert_close(top.attributions.sum(-1), expected, **F32)
    peak = fine.attributions.abs().amax(0)
    assert fine.labels[int(peak.argmax())] in top.labels


@pytest.mark.parametrize("config", ["reference", "attention_bias"])
def test_random_tiny_models_decompose_exactly_at_every_step(config):
    model, cache = random_toy_run(config)
    n_layers = model.cfg.num_hidden_layers
    for row, position, target, other in ((0, 0, 5, None), (1, 3, 7, 11)):
        expected = logit_off_the_final_norm(model, cache, target, other, row=row, position=position)
        block = dla_by_step(cache, target, other=other, row=row, position=position)
        fine = dla_by_step(cache, target, other=other, row=row, position=position, granularity="component")
        neurons = dla_by_step(
            cache, target, other=other, row=row, position=position, granularity="component", expand_neurons=True
        )
        assert fine.steps == [0, 1, 2]
        for table in (block, fine, neurons):
            torch.testing.assert_close(table.attributions.sum(-1), expected, **F32)
        assert_splits_add_up(block, fine, n_layers)
        assert_splits_add_up(block, neurons, n_layers)
        assert ("L0_attn_bias" in fine.labels) == (config == "attention_bias")
        # the logit is not trivially small: a dropped component would show
        assert expected.abs().max() > 0.1 and fine.attributions.abs().max() < 1e3


def test_missing_hooks_and_steps_are_refused(run):
    model, _, cache = run
    with pytest.raises(ValueError, match="not recorded"):
        dla_by_step(cache, "8", position=0, steps=[99])
    _, partial = model.generate_with_cache(
        model.to_tokens("squares 400 800:"),
        names_filter=["decoder.blocks.*.hook_attn_out"],
        noise=ReplayNoise(40),
        progress=False,
    )
    with pytest.raises(KeyError, match="DLA_NAMES"):
        dla_by_step(partial, "8", position=0)
    # the component names recorded without the opt-in switches: the error names the switches
    _, unswitched = model.generate_with_cache(
        model.to_tokens("squares 400 800:"), names_filter=DLA_COMPONENT_NAMES, noise=ReplayNoise(40), progress=False
    )
    message = r"attn.hook_result.*set_use_attn_result\(True\) and model.set_use_expert_outputs\(True\).*DLA_COMPONENT"
    with pytest.raises(KeyError, match=message):
        dla_by_step(unswitched, "8", position=0, granularity="component")
    with pytest.raises(KeyError, match="mlp.hook_post.*DLA_NEURON_NAMES"):
        dla_by_step(unswitched, "8", position=0, granularity="component", expand_neurons=True)
    with pytest.raises(ValueError, match="granularity must be 'block' or 'component'"):
        dla_by_step(cache, "8", position=0, granularity="head")
    with pytest.raises(ValueError, match="expand_neurons applies to granularity='component'"):
        dla_by_step(cache, "8", position=0, expand_neurons=True)
    with pytest.raises(IndexError, match="row 1 out of range for a batch of 1"):
        dla_by_step(cache, "8", position=0, row=1)
    with pytest.raises(IndexError, match="position 48 out of range"):
        dla_by_step(cache, "8", position=48, granularity="component")
    with pytest.raises(ValueError, match="k must be at least 1"):
        dla_by_step(cache, "8", position=0).keep_top(0)


def test_figure_has_a_row_per_step(run):
    model, _, cache = run
    dla = dla_by_step(cache, "8", other="7", position=0)
    fig = plot_dla_by_step(dla, model.tokenizer)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels[0].startswith("step 0 (-") and len(labels) == len(dla.steps)
    assert "'8' − '7' at position 0" in fig.axes[0].get_title()


def test_figure_of_components_separates_blocks_and_keeps_the_largest(run):
    model, _, cache = run
    fine = dla_by_step(cache, "8", other="7", position=0, granularity="component")
    ax = plot_dla_by_step(fine, model.tokenizer).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == fine.labels
    assert len(ax.lines) == model.cfg.num_hidden_layers  # a rule before each block's first component
    neurons = dla_by_step(cache, "8", other="7", position=0, granularity="component", expand_neurons=True)
    ax = plot_dla_by_step(neurons, model.tokenizer, max_components=20).axes[0]
    shown = [t.get_text() for t in ax.get_xticklabels()]
    assert len(shown) == 21 and shown[-1] == "rest" and set(shown[:-1]) <= set(neurons.labels)
    assert f"largest 20 of {len(neurons.labels)} components" in ax.get_title()
    torch.testing.assert_close(torch.tensor(ax.images[0].get_array()).sum(-1).float(), neurons.logit, **F32)


def test_viewer_panel_shows_the_table_and_follows_the_slider(run, driver, open_page, tmp_path):
    model, result, cache = run
    dla = dla_by_step(cache, "8", other="7", position=0)
    path = write_viewer(result.trace, model.tokenizer, tmp_path / "v.html", dla=dla)
    open_page(path)
    assert driver.execute_script("return document.getElementById('dla').hidden") is False
    values = driver.execute_script(
        "return Array.from(document.querySelectorAll('.dla-cell')).map(c => Number(c.dataset.value))"
    )
    assert torch.allclose(torch.tensor(values).view_as(dla.attributions), dla.attributions, atol=1e-4)
    set_step(driver, 1)
    current = driver.execute_script("return document.querySelector('#dla-table tr.current').dataset.step")
    assert current == "1"
    assert driver.execute_script("return document.querySelector('.cell.dla-position').dataset.position") == "0"
    title = driver.execute_script("return document.getElementById('dla-title').textContent")
    assert "'8' − '7' at position 0" in title
    # a component table: every head, MLP and expert column, a rule before each block
    fine = dla_by_step(cache, "8", other="7", position=0, granularity="component")
    open_page(write_viewer(result.trace, model.tokenizer, tmp_path / "c.html", dla=fine))
    labels = driver.execute_script(
        "return Array.from(document.querySelectorAll('th.dla-label')).map(c => c.textContent)"
    )
    assert labels == fine.labels
    starts = driver.execute_script("return Array.from(document.querySelectorAll('th.dla-block-start')).length")
    assert starts == model.cfg.num_hidden_layers
    # a neuron table is narrowed to the largest components and says so
    neurons = dla_by_step(cache, "8", other="7", position=0, granularity="component", expand_neurons=True)
    open_page(write_viewer(result.trace, model.tokenizer, tmp_path / "n.html", dla=neurons))
    labels = driver.execute_script(
        "return Array.from(document.querySelectorAll('th.dla-label')).map(c => c.textContent)"
    )
    assert len(labels) == 61 and labels[-1] == "rest"
    title = driver.execute_script("return document.getElementById('dla-title').textContent")
    assert f"largest 60 of {len(neurons.labels)} components" in title
    other_row = type(dla)(**{**dla.__dict__, "row": 1})
    with pytest.raises(ValueError, match="row"):
        write_viewer(result.trace, model.tokenizer, tmp_path / "w.html", dla=other_row)
