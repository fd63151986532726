"""The viewer's SAE feature panel, checked in headless Chromium: for each chosen feature the page shows
the activations the feature cache holds (per step and position), the run's strongest positions with the
canvas read around them, and the store's top examples with their prompt and token context."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_viewer import HOSTILE, HOSTILE_TITLE, set_step

from diffusionlens import HookedDiffusionGemma, ReplayNoise
from diffusionlens.features import ActivationStore, generate_with_sae, top_activations
from diffusionlens.toy import make_dataset
from diffusionlens.viz import FeaturePanel, render_viewer, write_viewer
from diffusionlens.viz.feature_panel import feature_panel_data

HOOK = "decoder.blocks.3.hook_resid_post"
ACTS = HOOK + ".hook_sae_acts_post"
STEPS = 5


class TinySAE(torch.nn.Module):
    """A seeded random ReLU SAE with SAELens's encode/decode interface (no training, no SAELens needed)."""

    def __init__(self, d_in: int, d_sae: int, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.W_enc = torch.randn(d_in, d_sae, generator=generator) / d_in**0.5
        self.b_enc = torch.full((d_sae,), -0.5)
        self.W_dec = self.W_enc.T.clone()
        self.cfg = SimpleNamespace(d_in=d_in, d_sae=d_sae)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.W_enc + self.b_enc)

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        return acts @ self.W_dec


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = HookedDiffusionGemma.from_pretrained("toy", progress=False)
    sae = TinySAE(model.cfg.hidden_size, 24)
    prompts = [e.prompt for e in make_dataset("squares", 6, seed=3, split="eval")]
    store = ActivationStore(tmp_path_factory.mktemp("store"), model, [HOOK], prompts=prompts, max_denoising_steps=8)
    store.harvest(progress=False)
    examples = top_activations(sae, store, HOOK, k=4, context=2, progress=False)
    result, _, cache = generate_with_sae(
        model,
        model.to_tokens("squares 400 800:"),
        sae,
        HOOK,
        use_error_term=True,
        noise=ReplayNoise(0),
        max_denoising_steps=STEPS,
        stability_threshold=STEPS + 1,  # never stops early: exactly STEPS steps
        progress=False,
    )
    assert result.trace[0].n_steps == STEPS
    return SimpleNamespace(model=model, sae=sae, store=store, examples=examples, result=result, cache=cache)


def decode(model, ids) -> list[str]:
    return ["\u00b7" if i is None or i < 0 else model.tokenizer.decode([int(i)]) for i in ids]


def expected_run(cache, feature: int):
    """[step, pos] activations of `feature`, the positions ordered by their peak, and each one's first peak step."""
    acts = cache[ACTS][:, 0, :, feature]
    peak = acts.amax(0)
    order = [int(p) for p in peak.argsort(descending=True, stable=True) if peak[p] > 0]
    first_peak = {p: int((acts[:, p] == peak[p]).nonzero()[0]) for p in order}
    return acts, order, first_peak


# --------------------------------------------------------------------------- without a browser


def test_top_activation_context_is_the_stores_rows_around_the_example(setup):
    labels = setup.store.labels()
    keys = zip(*(labels[f].tolist() for f in ("prompt_id", "seed", "canvas", "step", "position")), strict=True)
    tokens = zip(labels["input_token"].tolist(), labels["final_token"].tolist(), strict=True)
    lookup = dict(zip(keys, tokens, strict=True))
    wide = top_activations(setup.sae, setup.store, HOOK, k=2, features=[0, 5], context=30, progress=False)
    assert setup.examples.hook_name == HOOK and setup.examples.context_width == 2 and wide.context_width == 30
    assert (wide.context["input_token"] == -1).any()  # a window of 61 positions runs off a 48-position canvas
    for examples in (setup.examples, wide):
        w = examples.context_width
        for i in range(len(examples.features)):
            for j in range(examples.values.shape[1]):
                if examples.rows[i, j] < 0:
                    assert (examples.context["input_token"][i, j] == -1).all()
                    continue
                lab = {f: int(v[i, j]) for f, v in examples.labels.items()}
                for o, offset in enumerate(range(-w, w + 1)):
                    key = (lab["prompt_id"], lab["seed"], lab["canvas"], lab["step"], lab["position"] + offset)
                    read, final = lookup.get(key, (-1, -1))
                    assert int(examples.context["input_token"][i, j, o]) == read
                    assert int(examples.context["final_token"][i, j, o]) == final
                assert int(examples.context["input_token"][i, j, w]) == lab["input_token"]
    assert setup.examples.values.shape == (24, 4)
    with pytest.raises(ValueError, match="context must be >= 0"):
        top_activations(setup.sae, setup.store, HOOK, context=-1, progress=False)
    with pytest.raises(IndexError, match="d_sae=24"):
        top_activations(setup.sae, setup.store, HOOK, features=[24], progress=False)


def test_panel_data_is_what_the_cache_and_examples_hold(setup):
    panel = FeaturePanel(HOOK, cache=setup.cache, examples=setup.examples, prompts=setup.store.prompts, top=3)
    data, ids = feature_panel_data(panel, setup.result.trace[0], canvas=0, row=0, n_steps=STEPS)
    run_max = setup.cache[ACTS][:, 0].amax((0, 1))
    assert [item["feature"] for item in data["items"]] == run_max.argsort(descending=True, stable=True)[:3].tolist()
    for item in data["items"]:
        acts, order, first_peak = expected_run(setup.cache, item["feature"])
        assert torch.tensor(item["run"]["acts"]) == pytest.approx(acts, abs=1e-4)
        assert item["run"]["curve_positions"] == order[:4]
        assert [(e["position"], e["step"]) for e in item["run"]["examples"]] == [(p, first_peak[p]) for p in order[:6]]
        i = setup.examples.features.index(item["feature"])
        assert item["store"]["mean_by_step"] == pytest.approx(setup.examples.mean_by_step[i].tolist(), abs=1e-4)
        assert [e["value"] for e in item["store"]["examples"]] == pytest.approx(
            setup.examples.values[i][setup.examples.rows[i] >= 0].tolist(), abs=1e-4
        )
    shown = {t for item in data["items"] for e in item["run"]["examples"] for t in e["context"]}
    shown |= {t for item in data["items"] for e in item["store"]["examples"] for t in e["context_input"]}
    shown |= {t for item in data["items"] for e in item["store"]["examples"] for t in e["context_final"]}
    assert shown - {None} <= ids  # every token the panel shows has its text on the page


def test_panel_refuses_bad_input(setup):
    model, cache, examples = setup.model, setup.cache, setup.examples
    trace = setup.result.trace
    with pytest.raises(ValueError, match="cache= .*examples="):
        FeaturePanel(HOOK)
    _, plain = model.generate_with_cache(model.to_tokens("squares 400 800:"), names_filter=[HOOK], progress=False)
    with pytest.raises(KeyError, match="generate_with_sae"):
        FeaturePanel(HOOK, cache=plain)
    with pytest.raises(ValueError, match="gathered at"):
        FeaturePanel("decoder.blocks.2.hook_resid_post", examples=examples)
    with pytest.raises(ValueError, match="curves must be >= 1"):
        FeaturePanel(HOOK, cache=cache, curves=0)
    with pytest.raises(IndexError, match="d_sae=24"):
        render_viewer(trace, None, features=FeaturePanel(HOOK, cache=cache, features=[3, 99]))
    few = top_activations(setup.sae, setup.store, HOOK, k=2, features=[0, 1], progress=False)
    with pytest.raises(ValueError, match=r"features \[5\] are not among the examples' features"):
        render_viewer(trace, None, features=FeaturePanel(HOOK, cache=cache, examples=few, features=[1, 5]))
    with pytest.raises(ValueError, match="pass store.prompts"):
        render_viewer(trace, None, features=FeaturePanel(HOOK, examples=examples, prompts=["only one"]))
    with pytest.raises(IndexError, match="row 1 out of range"):
        feature_panel_data(FeaturePanel(HOOK, cache=cache), trace[0], canvas=0, row=1, n_steps=STEPS)
    with pytest.raises(ValueError, match="canvases \\[0\\]"):
        feature_panel_data(FeaturePanel(HOOK, cache=cache), trace[0], canvas=1, row=0, n_steps=STEPS)
    short = model.generate(model.to_tokens("squares 400 800:"), max_denoising_steps=2, progress=False)
    with pytest.raises(ValueError, match="same run"):
        render_viewer(short.trace, None, features=FeaturePanel(HOOK, cache=cache))
    silent = SimpleNamespace(encode=lambda x: torch.zeros(*x.shape[:-1], 4), decode=lambda a: a, cfg=None)
    dark_run, _, dark = generate_with_sae(
        model, model.to_tokens("12+34="), silent, HOOK, use_error_term=True, progress=False
    )
    with pytest.raises(ValueError, match="no SAE feature fires"):
        render_viewer(dark_run.trace, None, features=FeaturePanel(HOOK, cache=dark))


# --------------------------------------------------------------------------- in Chromium


def dataset_values(driver, selector: str, key: str = "value") -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).map(e => e.dataset[arguments[1]])", selector, key
    )


def context_texts(driver, row) -> list[list[str]]:
    """The token texts of each context shown in a table row."""
    return driver.execute_script(
        "return Array.from(arguments[0].querySelectorAll('.ctx'))"
        ".map(c => Array.from(c.querySelectorAll('.ctx-token')).map(t => t.textContent))",
        row,
    )


def test_feature_panel_shows_the_cache_and_the_store(setup, driver, open_page, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    model, cache, examples, store = setup.model, setup.cache, setup.examples, setup.store
    trace = setup.result.trace[0]
    panel = FeaturePanel(HOOK, cache=cache, examples=examples, prompts=store.prompts, top=3)
    path = write_viewer(setup.result.trace, model.tokenizer, tmp_path / "features.html", features=panel)
    open_page(path)
    assert driver.find_element(By.ID, "features").is_displayed()
    assert driver.find_element(By.ID, "features-title").text == f"SAE features at {HOOK}"
    select = Select(driver.find_element(By.ID, "feature-select"))
    chosen = cache[ACTS][:, 0].amax((0, 1)).argsort(descending=True, stable=True)[:3].tolist()
    assert [o.text.split(" (")[0] for o in select.options] == [f"feature {f}" for f in chosen]

    for index, feature in enumerate(chosen):
        select.select_by_value(str(index))
        acts, order, first_peak = expected_run(cache, feature)
        curves = order[:4]
        # the canvas marks and the step table follow the slider; values are the cache's
        for step in range(STEPS):
            set_step(driver, step)
            marks = [float(v) for v in dataset_values(driver, "#canvas .feature-act")]
            assert marks == pytest.approx(acts[step].tolist(), abs=1e-4)
            current = dataset_values(driver, "#feature-steps th.current", "step")
            assert current == [str(step)]
        cells = driver.find_elements(By.CSS_SELECTOR, "#feature-steps .feature-value")
        assert len(cells) == len(curves) * STEPS
        for cell in cells:
            step, position = int(cell.get_attribute("data-step")), int(cell.get_attribute("data-position"))
            assert position in curves
            assert float(cell.get_attribute("data-value")) == pytest.approx(float(acts[step, position]), abs=1e-4)
            assert cell.text == f"{float(acts[step, position]):.2f}"
        assert len(driver.find_elements(By.CSS_SELECTOR, "#feature-chart polyline.feature-curve")) == len(curves) + 1
        # the run's strongest positions, each with the canvas read at its peak step around it
        rows = driver.find_elements(By.CSS_SELECTOR, "#feature-run-examples .run-example")
        assert [(int(r.get_attribute("data-position")), int(r.get_attribute("data-step"))) for r in rows] == [
            (p, first_peak[p]) for p in order[:6]
        ]
        for r in rows:
            step, position = int(r.get_attribute("data-step")), int(r.get_attribute("data-position"))
            read = trace.input_canvas[step, 0].tolist()
            window = [read[p] if 0 <= p < len(read) else None for p in range(position - 3, position + 4)]
            assert context_texts(driver, r) == [decode(model, window)]
            assert float(r.get_attribute("data-value")) == pytest.approx(float(acts[step, position]), abs=1e-4)
        # the store's top examples: prompt text, labels and the tokens read / finally written around them
        i = examples.features.index(feature)
        rows = driver.find_elements(By.CSS_SELECTOR, "#feature-store-examples .store-example")
        assert len(rows) == int((examples.rows[i] >= 0).sum())
        for j, r in enumerate(rows):
            lab = {f: int(v[i, j]) for f, v in examples.labels.items()}
            assert r.find_element(By.CSS_SELECTOR, "td.prompt").text == store.prompts[lab["prompt_id"]]
            assert int(r.get_attribute("data-step")) == lab["step"]
            assert int(r.get_attribute("data-position")) == lab["position"]
            assert float(r.get_attribute("data-value")) == pytest.approx(float(examples.values[i, j]), abs=1e-4)
            assert context_texts(driver, r) == [
                decode(model, examples.context["input_token"][i, j].tolist()),
                decode(model, examples.context["final_token"][i, j].tolist()),
            ]
        # per step: the store's mean activation on the rows where the feature fires, and how often it fires
        rate, mean = examples.fire_rate_by_step[i, :STEPS], examples.mean_by_step[i, :STEPS]
        shown = [float(v) if v else None for v in dataset_values(driver, "#feature-steps td.feature-store-mean")]
        expected = [float(m / r) if r > 0 else None for m, r in zip(mean, rate, strict=True)]
        assert shown[: len(expected)] == pytest.approx(expected, abs=1e-3)
        assert set(shown[len(expected) :]) <= {None}  # steps the store never reached
        rates = [float(v) for v in dataset_values(driver, "#feature-steps td.feature-store-rate") if v]
        assert rates == pytest.approx(rate.tolist(), abs=1e-4)

    # clicking a run example shows its step
    target = driver.find_elements(By.CSS_SELECTOR, "#feature-run-examples .run-example")[-1]
    set_step(driver, 0 if target.get_attribute("data-step") != "0" else 1)
    target.click()
    assert driver.find_element(By.ID, "step-label").text == f"step {target.get_attribute('data-step')} / {STEPS - 1}"


def test_feature_panel_text_is_displayed_not_executed(setup, driver, open_page, tmp_path):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    hostile = [HOSTILE_TITLE] * len(setup.store.prompts)
    panel = FeaturePanel(HOOK, cache=setup.cache, examples=setup.examples, prompts=hostile, top=2)
    path = write_viewer(setup.result.trace, lambda i: HOSTILE[i % len(HOSTILE)], tmp_path / "h.html", features=panel)
    open_page(path)
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018 - raises when no alert is open
    assert driver.execute_script("return window.__xss === undefined")
    assert len(driver.find_elements(By.TAG_NAME, "script")) == 2
    assert driver.find_elements(By.TAG_NAME, "img") == []
    assert driver.find_elements(By.CSS_SELECTOR, "#features b, #features script") == []
    prompts = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#feature-store-examples td.prompt")]
    assert prompts and set(prompts) == {HOSTILE_TITLE}
    shown = driver.execute_script(
        "return Array.from(document.querySelectorAll('#features .ctx-token')).map(e => e.textContent)"
    )
    assert "<script>alert(1)</script>" in shown


def test_viewer_without_features_has_no_panel(setup, driver, open_page, tmp_path):
    from selenium.webdriver.common.by import By

    path = write_viewer(setup.result.trace, setup.model.tokenizer, tmp_path / "plain.html")
    open_page(path)
    assert not driver.find_element(By.ID, "features").is_displayed()
    assert driver.find_elements(By.CSS_SELECTOR, ".feature-act") == []
    store_only = FeaturePanel(HOOK, examples=setup.examples, prompts=setup.store.prompts, top=2)
    open_page(write_viewer(setup.result.trace, setup.model.tokenizer, tmp_path / "s.html", features=store_only))
    best = setup.examples.values[:, 0].argsort(descending=True, stable=True)[:2].tolist()
    options = driver.find_elements(By.CSS_SELECTOR, "#feature-select option")
    assert [o.text for o in options] == [f"feature {setup.examples.features[b]}" for b in best]
    assert driver.find_elements(By.CSS_SELECTOR, ".run-example") == []
    assert driver.find_elements(By.CSS_SELECTOR, ".store-example")
