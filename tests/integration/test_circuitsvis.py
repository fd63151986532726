"""The circuitsvis export: `attention_heads` with the canvas unmasked (it attends both ways), its offline page
drawn in headless Chromium, and token labels that stay text."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch
from test_attention_view import FULL_LAYER, PATTERNS
from test_viewer import HOSTILE

from diffusionlens import HookedDiffusionGemma, ReplayNoise
from diffusionlens.viz import attention_circuitsvis, attention_labels, attention_pattern, write_attention_circuitsvis
from diffusionlens.viz.attention import square_attention

circuitsvis = pytest.importorskip("circuitsvis")


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


def export(padded, **kw):
    ids, mask, result, cache = padded
    return attention_circuitsvis(
        cache, result.trace, step=1, layer=FULL_LAYER, tokens=ids, attention_mask=mask, row=1, **kw
    )


def props_of(source: str) -> dict:
    """The props circuitsvis renders AttentionHeads with, read back from the page's script."""
    match = re.search(r"CircuitsVis\.AttentionHeads,\s*(\{[^\n]*\})\s*\)", source)
    assert match is not None
    return json.loads(match.group(1))


def test_export_is_attention_heads_unmasked_with_canvas_queries_on_their_keys(model, padded):
    ids, mask, result, cache = padded
    props = props_of(export(padded).local_src)
    keys = attention_labels(model, result.trace, 1, FULL_LAYER, tokens=ids, attention_mask=mask, row=1)
    assert props["maskUpperTri"] is False
    assert props["tokens"] == keys.labels() and "(pad)" in props["tokens"][0]
    assert props["attentionHeadNames"] == [f"L{FULL_LAYER}H{h}" for h in range(model.cfg.num_attention_heads)]
    # the square given to circuitsvis: prompt rows empty, canvas rows the recorded pattern, each row sums to 1
    pattern = attention_pattern(cache, 1, FULL_LAYER, row=1)
    square = square_attention(pattern, keys)
    assert torch.equal(torch.tensor(props["attention"]), square)
    assert bool((square[:, : keys.n_prompt] == 0).all())
    assert torch.equal(square[:, keys.n_prompt :], pattern)
    assert torch.allclose(square[:, keys.n_prompt :].sum(-1), torch.ones(1), atol=1e-5)
    # canvas queries read later canvas keys too: a causal mask would hide real weight
    assert float(square.triu(1).sum()) > 1.0


def coloured_pixels(driver, timeout: float = 10.0) -> int:
    """Pixels of the zoomed pattern (the page's largest canvas) coloured by a weight, once the chart settles:
    blue shades (positive weights mix blue with white); circuitsvis paints masked cells grey, rgb(200,200,200)."""
    script = """
        const canvases = Array.from(document.querySelectorAll('canvas'));
        if (!canvases.length) return -1;
        const c = canvases.reduce((a, b) => (a.width >= b.width ? a : b));
        const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 0; i < px.length; i += 4) if (px[i + 3] > 0 && px[i + 2] - px[i] > 10) n++;
        return n;"""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        count = driver.execute_script(script)
        if count > 0 and count == last:
            return count
        last = count
        time.sleep(0.5)
    raise AssertionError(f"the circuitsvis view did not settle (last count {last})")


def test_offline_page_draws_the_keys_after_the_query(model, padded, driver, tmp_path):
    view = export(padded)
    page = write_attention_circuitsvis(tmp_path / "heads.html", view)
    text = page.read_text()
    assert "unpkg.com" not in text and '<script crossorigin type="module">' in text
    driver.get(page.resolve().as_uri())
    drawn = coloured_pixels(driver)
    body = driver.execute_script("return document.body.innerText")
    assert "Head Selector" in body and f"L{FULL_LAYER}H0 Zoomed" in body
    # the same square drawn with circuitsvis's default causal mask loses the weight above the diagonal
    props = props_of(view.local_src)
    masked = circuitsvis.attention.attention_heads(attention=props["attention"], tokens=props["tokens"])
    masked_page = tmp_path / "masked.html"
    masked_page.write_text(f"<!doctype html><html><body>{masked.local_src}</body></html>", encoding="utf-8")
    driver.get(masked_page.resolve().as_uri())
    assert drawn > 1.2 * coloured_pixels(driver)


def test_hostile_labels_stay_text(model, padded, driver, tmp_path):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    def hostile(token: int) -> str:
        return HOSTILE[token % len(HOSTILE)]

    view = export(padded, tokenizer=hostile)
    assert "<script>alert(1)</script>" not in view.local_src and "</script><script>" not in view.cdn_src
    page = write_attention_circuitsvis(
        tmp_path / "hostile.html", view, title="</title><script>window.__xss = 9</script>"
    )
    driver.get(page.resolve().as_uri())
    coloured_pixels(driver)
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018 - raises when no alert is open
    assert driver.execute_script("return window.__xss === undefined")
    # circuitsvis renders into the div that holds its script, so no script element is left to count
    assert driver.title == "</title><script>window.__xss = 9</script>"
    assert driver.find_elements(By.TAG_NAME, "img") == []
    assert any("<script>alert(1)</script>" in label for label in props_of(view.local_src)["tokens"])
