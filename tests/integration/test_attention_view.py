"""Attention patterns with labelled keys: the labels match the keys each decoder layer really has (padding,
sliding windows, earlier canvases), and the HTML attention page in headless Chromium (the circuitsvis export:
test_circuitsvis.py)."""

from __future__ import annotations

import pytest
import torch
from test_viewer import HOSTILE

from diffusionlens import HookedDiffusionGemma, ReplayNoise
from diffusionlens.viz import attention_labels, attention_pattern, write_attention_viewer
from diffusionlens.viz.attention import labelled_pattern

SLIDING_LAYER, FULL_LAYER = 0, 2
PATTERNS = lambda name: name.startswith("decoder.") and name.endswith("attn.hook_pattern")  # noqa: E731


@pytest.fixture(scope="module")
def model():
    return HookedDiffusionGemma.from_pretrained("toy", progress=False)


@pytest.fixture(scope="module")
def padded(model):
    """Two prompts, the second left-padded by two tokens; patterns of every decoder layer recorded."""
    ids, mask = model.to_tokens_and_mask(["squares 400 800:", "squares 40 80:"])
    result, cache = model.generate_with_cache(
        ids, attention_mask=mask, names_filter=PATTERNS, noise=ReplayNoise(40), progress=False
    )
    return ids, mask, result, cache


@pytest.fixture(scope="module")
def two_canvases(model):
    ids = model.to_tokens("squares 400 800:")
    result, cache = model.generate_with_cache(
        ids,
        max_new_tokens=2 * model.cfg.canvas_length,
        eos_token_id=None,
        names_filter=PATTERNS,
        noise=ReplayNoise(3),
        progress=False,
    )
    return result, cache


def test_cfg_is_what_these_tests_assume(model):
    assert model.cfg.is_sliding(SLIDING_LAYER) and not model.cfg.is_sliding(FULL_LAYER)
    assert model.cfg.sliding_window - 1 < 17  # the prompt is longer than a sliding layer keeps


def test_full_layer_labels_every_prompt_token_and_marks_padding(model, padded):
    ids, mask, result, cache = padded
    trace, prompt_length = result.trace, ids.shape[1]
    assert mask[1, :2].tolist() == [0, 0] and bool(mask[0].all())
    for row in (0, 1):
        keys = attention_labels(model, trace, 1, FULL_LAYER, tokens=ids, attention_mask=mask, row=row)
        assert keys.n_prompt == prompt_length
        assert keys.positions == list(range(prompt_length)) + list(range(model.cfg.canvas_length))
        assert keys.tokens[:prompt_length] == ids[row].tolist()
        assert keys.tokens[prompt_length:] == trace[0].input_canvas[1, row].tolist()
        assert keys.padding[:prompt_length] == (~mask[row].bool()).tolist()
        pattern, _ = labelled_pattern(model, cache, trace, 1, FULL_LAYER, tokens=ids, attention_mask=mask, row=row)
        # the labels are right where the model agrees: no query reads a key labelled padding
        padding = torch.tensor(keys.padding)
        assert bool((pattern[..., padding] == 0).all())
        assert bool((pattern[..., ~padding].sum(-1) > 0.999).all())
    assert (
        attention_labels(model, trace, 1, FULL_LAYER, tokens=ids, attention_mask=mask, row=1).label(0).endswith("(pad)")
    )


def test_sliding_layer_keeps_only_the_last_window_of_the_prompt(model, padded):
    ids, mask, result, cache = padded
    keep = model.cfg.sliding_window - 1
    prompt_length = ids.shape[1]
    keys = attention_labels(model, result.trace, 0, SLIDING_LAYER, tokens=ids, attention_mask=mask, row=1)
    assert keys.n_prompt == keep
    assert keys.positions[:keep] == list(range(prompt_length - keep, prompt_length))
    assert keys.tokens[:keep] == ids[1, -keep:].tolist()
    assert not any(keys.padding)  # row 1's two pads fall outside the window
    assert keys.label(0) == f"p{prompt_length - keep}:{keys.texts[0]}"
    pattern = attention_pattern(cache, 0, SLIDING_LAYER, row=1)
    assert pattern.shape[-1] == len(keys)


def test_a_later_canvas_reads_the_earlier_canvas_as_prompt(model, two_canvases):
    result, cache = two_canvases
    trace, length = result.trace, model.cfg.canvas_length
    assert len(trace) == 2
    encoded = trace.prompt_length + length
    keep = model.cfg.sliding_window - 1
    for layer, first in ((FULL_LAYER, 0), (SLIDING_LAYER, encoded - keep)):
        pattern, keys = labelled_pattern(model, cache, trace, 0, layer, tokens=result.sequences, canvas=1)
        assert keys.positions[: keys.n_prompt] == list(range(first, encoded))
        assert keys.tokens[: keys.n_prompt] == result.sequences[0, first:encoded].tolist()
        assert pattern.shape[-1] == len(keys)
    with pytest.raises(ValueError, match="result.sequences"):
        attention_labels(model, trace, 0, FULL_LAYER, tokens=result.sequences[:, : trace.prompt_length], canvas=1)


def test_keys_name_the_pattern_they_label_and_labelled_pattern_reads_it(model, two_canvases):
    result, cache = two_canvases
    last = model.cfg.num_hidden_layers - 1
    keys = attention_labels(model, result.trace, 1, -1, tokens=result.sequences, canvas=1)
    assert (keys.step, keys.layer, keys.canvas, keys.row) == (1, last, 1, 0)
    pattern, same_keys = labelled_pattern(model, cache, result.trace, 1, -1, tokens=result.sequences, canvas=1)
    assert same_keys == keys
    assert torch.equal(pattern, attention_pattern(cache, 1, last, canvas=1))
    assert not torch.equal(pattern, attention_pattern(cache, 1, last, canvas=0))


def test_arguments_and_missing_recordings_are_refused(model, padded):
    ids, mask, result, cache = padded
    with pytest.raises(ValueError, match=r"layer=99 is out of range: a block index is 0\.\."):
        attention_labels(model, result.trace, 0, 99, tokens=ids)
    with pytest.raises(IndexError, match="step"):
        attention_labels(model, result.trace, 99, 0, tokens=ids)
    with pytest.raises(TypeError, match="DenoisingTrace"):
        attention_labels(model, result.trace[0], 0, 0, tokens=ids)
    _, unrecorded = model.generate_with_cache(
        ids, attention_mask=mask, names_filter="decoder.hook_logits", noise=ReplayNoise(40), progress=False
    )
    with pytest.raises(KeyError, match=r"decoder\.blocks\.0\.attn\.hook_pattern"):
        attention_pattern(unrecorded, 0, 0)


# --------------------------------------------------------------------------- in a browser


def page_for(model, padded, tmp_path, **kw):
    ids, mask, result, cache = padded
    return write_attention_viewer(
        model, cache, result.trace, tmp_path / "attention.html", tokens=ids, attention_mask=mask, row=1, **kw
    )


def choose(driver, element_id: str, value: str, event: str = "change") -> None:
    element = driver.find_element("id", element_id)
    driver.execute_script(
        "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event(arguments[2]));", element, value, event
    )


def weights(driver) -> torch.Tensor:
    rows = driver.execute_script(
        "return Array.from(document.querySelectorAll('#pattern tr')).slice(1).map("
        "r => Array.from(r.querySelectorAll('.att-cell')).map(c => Number(c.dataset.weight)))"
    )
    return torch.tensor(rows)


def test_page_follows_layer_head_and_step(model, padded, driver, open_page, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    ids, mask, result, cache = padded
    open_page(page_for(model, padded, tmp_path))
    assert len(driver.find_elements(By.CSS_SELECTOR, "#layer-select option")) == model.cfg.num_hidden_layers
    for layer, head, step in ((SLIDING_LAYER, 1, 0), (FULL_LAYER, 0, 1), (FULL_LAYER, 0, 2)):
        choose(driver, "layer-select", str(layer))
        choose(driver, "head-select", str(head))
        choose(driver, "step-slider", str(step), "input")
        keys = attention_labels(model, result.trace, step, layer, tokens=ids, attention_mask=mask, row=1)
        shown = driver.execute_script(
            "return Array.from(document.querySelectorAll('.key-label')).map(e => e.textContent)"
        )
        assert shown == keys.texts
        expected = attention_pattern(cache, step, layer, row=1)[head]
        assert torch.allclose(weights(driver), expected, atol=1e-4)
    # hover a canvas query's cell on a padding key, then a key label
    cell = driver.find_element(By.CSS_SELECTOR, '.att-cell[data-query="3"][data-key="0"]')
    ActionChains(driver).move_to_element(cell).perform()
    tip = driver.find_element(By.ID, "tooltip").text
    assert "query: canvas 3" in tip and "key: prompt 0" in tip and "(padding)" in tip and "weight 0.0000" in tip
    label = driver.find_elements(By.CSS_SELECTOR, ".key-label")[ids.shape[1] + 5]
    ActionChains(driver).move_to_element(label).perform()
    assert "key: canvas 5" in driver.find_element(By.ID, "tooltip").text


def test_hostile_token_text_is_displayed_not_executed(model, padded, driver, open_page, tmp_path):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    def hostile(token: int) -> str:
        return HOSTILE[token % len(HOSTILE)]

    page = page_for(model, padded, tmp_path, tokenizer=hostile, title="</title><script>window.__xss = 9</script>")
    assert "<script>alert(1)</script>" not in page.read_text()
    open_page(page)
    choose(driver, "layer-select", str(FULL_LAYER))
    ActionChains(driver).move_to_element(driver.find_element(By.CSS_SELECTOR, ".att-cell")).perform()
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018 - raises when no alert is open
    assert driver.execute_script("return window.__xss === undefined")
    assert len(driver.find_elements(By.TAG_NAME, "script")) == 2
    assert driver.find_elements(By.TAG_NAME, "img") == []
    assert driver.find_elements(By.CSS_SELECTOR, "#pattern b, #pattern script, #tooltip script") == []
    ids = padded[0]
    shown = driver.execute_script("return Array.from(document.querySelectorAll('.key-label')).map(e => e.textContent)")
    assert shown[: ids.shape[1]] == [hostile(int(i)) if hostile(int(i)) != " " else "␣" for i in ids[1]]
