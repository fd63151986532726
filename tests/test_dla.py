"""Direct logit attribution across steps: each step's components sum to its pre-soft-cap logit difference,
missing recordings are refused, and the figure and the viewer panel show the table."""

from __future__ import annotations

import pytest
import torch
from test_viewer import open_page, set_step

from diffusionlens import HookedDiffusionGemma, ReplayNoise
from diffusionlens.analysis import DLA_NAMES, dla_by_step
from diffusionlens.viz import plot_dla_by_step, write_viewer


@pytest.fixture(scope="module")
def run():
    model = HookedDiffusionGemma.from_pretrained("toy", progress=False)
    result, cache = model.generate_with_cache(
        model.to_tokens("squares 400 800:"),
        names_filter=[*DLA_NAMES, "decoder.hook_logits"],
        noise=ReplayNoise(40),
        progress=False,
    )
    return model, result, cache


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


def test_figure_has_a_row_per_step(run):
    model, _, cache = run
    dla = dla_by_step(cache, "8", other="7", position=0)
    fig = plot_dla_by_step(dla, model.tokenizer)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels[0].startswith("step 0 (-") and len(labels) == len(dla.steps)
    assert "'8' − '7' at position 0" in fig.axes[0].get_title()


def test_viewer_panel_shows_the_table_and_follows_the_slider(run, driver, tmp_path):
    model, result, cache = run
    dla = dla_by_step(cache, "8", other="7", position=0)
    path = write_viewer(result.trace, model.tokenizer, tmp_path / "v.html", dla=dla)
    open_page(driver, path)
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
    other_row = type(dla)(**{**dla.__dict__, "row": 1})
    with pytest.raises(ValueError, match="row"):
        write_viewer(result.trace, model.tokenizer, tmp_path / "w.html", dla=other_row)
