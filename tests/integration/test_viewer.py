"""The HTML trajectory viewer, checked in a real headless Chromium (selenium): the DOM shows the trace's
tokens at every step of the slider, and token text is displayed, never executed."""

from __future__ import annotations

import json
import re

import pytest
import torch

from diffusionlens import HookedDiffusionGemma, ReplayNoise
from diffusionlens.sampling.trace import CanvasTrace, DenoisingTrace
from diffusionlens.viz import render_viewer, write_viewer
from diffusionlens.viz.viewer import script_safe_json

STEPS = 5

# Tokens that would run script if they reached the page as markup.
HOSTILE = {
    0: "<script>alert(1)</script>",
    1: "</script><script>window.__xss = 1</script>",
    2: '<img src=x onerror="window.__xss = 2">',
    3: "<!--",
    4: "a &amp; b",
    5: "\u2028",
    6: " ",
    7: "plain",
}
HOSTILE_TITLE = "</title><script>window.__xss = 3</script><b>bold</b>"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def toy():
    """A real toy-model trace that runs exactly STEPS steps (a stability window longer than the run never stops)."""
    model = HookedDiffusionGemma.from_pretrained("toy", progress=False)
    result = model.generate(
        model.to_tokens("squares 400 800:"),
        max_new_tokens=model.cfg.canvas_length,
        max_denoising_steps=STEPS,
        stability_threshold=STEPS + 1,
        noise=ReplayNoise(0),
        record_top_k=3,
        progress=False,
    )
    return result.trace, model.tokenizer


def hostile_trace() -> CanvasTrace:
    """Two steps, one row, a canvas of 8 positions over the ids of HOSTILE; top-k recorded."""
    steps, length, k = 2, len(HOSTILE), 3
    argmax = torch.stack([torch.arange(length), torch.arange(length).flip(0)])[:, None]
    accepted = torch.zeros(steps, 1, length, dtype=torch.bool)
    accepted[0, 0, :4] = True
    accepted[1, 0] = True
    top_tokens = torch.stack([(argmax + i) % length for i in range(k)], dim=-1)
    return CanvasTrace(
        input_canvas=argmax.roll(1, dims=-1),
        sampled=argmax,
        argmax=argmax,
        entropy=torch.linspace(0, 2, steps * length).view(steps, 1, length),
        accepted=accepted,
        next_canvas=argmax,
        finished=torch.tensor([[False], [True]]),
        temperature=torch.tensor([0.8, 0.4]),
        t=torch.tensor([2, 1]),
        top_k_tokens=top_tokens,
        top_k_probs=torch.softmax(-torch.arange(k, dtype=torch.float32), 0).expand(steps, 1, length, k).clone(),
    )


def hostile_decode(token: int) -> str:
    return HOSTILE[token]


def token_texts(driver) -> list[str]:
    return driver.execute_script("return Array.from(document.querySelectorAll('.token')).map(e => e.textContent)")


def set_step(driver, step: int) -> None:
    slider = driver.find_element("id", "step-slider")
    driver.execute_script(
        "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'));", slider, step
    )


def decode_all(tokenizer, ids: torch.Tensor) -> list[str]:
    return [tokenizer.decode([int(i)]) for i in ids]


# --------------------------------------------------------------------------- without a browser


def test_page_is_self_contained(toy):
    trace, tokenizer = toy
    page = render_viewer(trace, tokenizer, title="squares")
    assert re.search(r"\b(src|href)\s*=", page) is None  # nothing is loaded from anywhere
    assert "http://" not in page and "https://" not in page
    assert page.count("<script") == 2 and page.count("<style") == 1
    assert "default-src 'none'" in page  # the CSP forbids network access


def test_embedded_json_round_trips_and_cannot_close_the_script():
    trace = DenoisingTrace([hostile_trace()], prompt_length=3)
    page = render_viewer(trace, hostile_decode, title=HOSTILE_TITLE)
    for text in (*HOSTILE.values(), HOSTILE_TITLE):
        if "<" in text:
            assert text not in page
    body = re.search(r'<script type="application/json" id="trace-data">(.*?)</script>', page, flags=re.S).group(1)
    assert "<" not in body and ">" not in body and "&" not in body
    data = json.loads(body)
    assert data["text"] == {str(k): v for k, v in HOSTILE.items()}
    assert data["title"] == HOSTILE_TITLE
    assert json.loads(script_safe_json({"a": "</script><!--&"})) == {"a": "</script><!--&"}


def test_render_checks_its_arguments(toy):
    trace, tokenizer = toy
    with pytest.raises(IndexError):
        render_viewer(trace, tokenizer, canvas=len(trace))
    with pytest.raises(IndexError):
        render_viewer(trace, tokenizer, row=1)
    with pytest.raises(IndexError):
        render_viewer(trace, tokenizer, step=trace.steps(0))


# --------------------------------------------------------------------------- in Chromium


def test_slider_shows_each_steps_tokens(toy, driver, open_page, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    trace, tokenizer = toy
    ct = trace[0]
    n_steps, length = ct.n_steps, ct.input_canvas.shape[-1]
    assert n_steps == STEPS
    path = write_viewer(trace, tokenizer, tmp_path / "viewer.html", title="squares 400 800:")
    open_page(path)

    # initial DOM: one token per canvas position, step 0, the draft answer
    assert len(driver.find_elements(By.CSS_SELECTOR, ".token[data-position]")) == length
    assert driver.find_element(By.ID, "step-label").text == f"step 0 / {n_steps - 1}"
    assert driver.find_element(By.ID, "step-slider").get_attribute("max") == str(n_steps - 1)
    assert token_texts(driver) == decode_all(tokenizer, ct.argmax[0, 0])
    commits = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".commit[data-position]")]
    assert commits == [f"c{c}" for c in ct.commit_step()[0].tolist()]

    # every step of the slider shows that step's tokens, acceptance and commit state
    for step in [n_steps - 1, *range(n_steps)]:
        set_step(driver, step)
        assert driver.find_element(By.ID, "step-label").text == f"step {step} / {n_steps - 1}"
        assert token_texts(driver) == decode_all(tokenizer, ct.argmax[step, 0])
        accepted = driver.execute_script(
            "return Array.from(document.querySelectorAll('.cell')).map(e => e.classList.contains('accepted'))"
        )
        assert accepted == ct.accepted[step, 0].tolist()
        committed = driver.execute_script(
            "return Array.from(document.querySelectorAll('.cell')).map(e => e.classList.contains('committed'))"
        )
        assert committed == (ct.commit_step()[0] <= step).tolist()

    # the other views: the canvas the decoder read changes from the random start to the accepted tokens
    Select(driver.find_element(By.ID, "view-select")).select_by_value("input_canvas")
    set_step(driver, 0)
    first = token_texts(driver)
    assert first == decode_all(tokenizer, ct.input_canvas[0, 0])
    set_step(driver, n_steps - 1)
    assert token_texts(driver) == decode_all(tokenizer, ct.input_canvas[-1, 0])
    assert token_texts(driver) != first

    # arrow keys move the slider one step
    Select(driver.find_element(By.ID, "view-select")).select_by_value("argmax")
    driver.find_element(By.ID, "step-slider").send_keys(Keys.ARROW_LEFT)
    assert driver.find_element(By.ID, "step-label").text == f"step {n_steps - 2} / {n_steps - 1}"
    assert token_texts(driver) == decode_all(tokenizer, ct.argmax[n_steps - 2, 0])

    # hovering a position lists its top-k tokens at this step
    position = 3
    ActionChains(driver).move_to_element(driver.find_elements(By.CSS_SELECTOR, ".cell")[position]).perform()
    tooltip = driver.find_element(By.ID, "tooltip")
    assert tooltip.is_displayed()
    rows = tooltip.find_elements(By.CSS_SELECTOR, ".topk-row")
    top = ct.top_k_tokens[n_steps - 2, 0, position]
    assert [int(r.get_attribute("data-token-id")) for r in rows] == top.tolist()
    probs = [float(r.find_element(By.CSS_SELECTOR, ".topk-prob").text) for r in rows]
    assert probs == pytest.approx(ct.top_k_probs[n_steps - 2, 0, position].tolist(), abs=1e-3)


def test_token_text_is_displayed_not_executed(driver, open_page, tmp_path):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    ct = hostile_trace()
    path = write_viewer(DenoisingTrace([ct], prompt_length=3), hostile_decode, tmp_path / "v.html", title=HOSTILE_TITLE)
    open_page(path)

    def assert_inert():
        with pytest.raises(NoAlertPresentException):
            driver.switch_to.alert.text  # noqa: B018 - raises when no alert is open
        assert driver.execute_script("return window.__xss === undefined")
        assert len(driver.find_elements(By.TAG_NAME, "script")) == 2
        assert driver.find_elements(By.TAG_NAME, "img") == []
        assert driver.find_elements(By.CSS_SELECTOR, "#canvas b, #canvas script, #tooltip script") == []

    assert_inert()
    assert token_texts(driver) == [HOSTILE[int(i)] for i in ct.argmax[0, 0]]
    assert token_texts(driver)[0] == "<script>alert(1)</script>"
    assert driver.execute_script("return document.getElementById('title').textContent") == HOSTILE_TITLE
    assert driver.title == HOSTILE_TITLE

    set_step(driver, 1)
    assert token_texts(driver) == [HOSTILE[int(i)] for i in ct.argmax[1, 0]]
    ActionChains(driver).move_to_element(driver.find_elements(By.CSS_SELECTOR, ".cell")[0]).perform()
    shown = driver.execute_script(
        "return Array.from(document.querySelectorAll('#tooltip .topk-token')).map(e => e.textContent)"
    )
    assert shown == [HOSTILE[int(i)] for i in ct.top_k_tokens[1, 0, 0]]
    assert_inert()
