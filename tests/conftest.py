"""Test-run settings: runtime shape checks, and the fixtures the browser tests share.

jaxtyping's import hook wraps every function and dataclass in `diffusionlens` with a beartype check of
its tensor annotations (shapes and dtypes; tests/typecheck.py), so a wrong shape annotation fails a test
instead of misleading a reader. It must be installed before anything imports `diffusionlens`, which is
why it sits at the top of the first file pytest loads.
"""

from __future__ import annotations

import os

# beartype must be imported before nnsight (tests/integration/test_nnsight.py): after `import nnsight`,
# `import beartype` fails with "TypeError: unhashable type: 'instancemethod'" (nnsight 0.8.1, beartype's table
# of builtin method types), which broke collecting tests/unit/test_typecheck.py in unchecked runs.
import beartype  # noqa: F401
from jaxtyping import install_import_hook

# On with DIFFUSIONLENS_TYPECHECK=1, which is how CI runs the whole suite (README.md).
if os.environ.get("DIFFUSIONLENS_TYPECHECK") == "1":
    install_import_hook("diffusionlens", "typecheck.tensor_beartype")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


@pytest.fixture(autouse=True)
def _shape_checks_off_where_marked(request):
    """Turn the runtime checks off for cases marked `without_shape_checks`: a deliberately wrong dtype
    must reach the library's own validation, as it does for users, who run without the checker."""
    if request.node.get_closest_marker("without_shape_checks") is None:
        yield
        return
    import jaxtyping

    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", False)


@pytest.fixture(scope="module")
def toy():
    """The shipped toy model, loaded once per test module (tests may add hooks or edit its tokenizer)."""
    from diffusionlens import HookedDiffusionGemma

    return HookedDiffusionGemma.from_pretrained("toy", progress=False)


@pytest.fixture(scope="module")
def toy_pass():
    """The toy model with the inputs of one decoder pass: a prompt and a seeded random canvas."""
    import torch

    from diffusionlens import HookedDiffusionGemma

    model = HookedDiffusionGemma.from_pretrained("toy", progress=False)
    ids = model.to_tokens("squares 4 8:")
    canvas = torch.randint(
        0, model.cfg.vocab_size, (1, model.cfg.canvas_length), generator=torch.Generator().manual_seed(0)
    )
    return model, ids, canvas


@pytest.fixture(scope="module")
def model():
    """A tiny random DiffusionGemma (tests/reference.py's "mixed" config, seed 0). Modules that need another
    model define their own `model` fixture, which takes precedence."""
    from reference import build_pair

    return build_pair("mixed")[1]


@pytest.fixture(scope="module")
def ids():
    """Two prompts of six ids for the "mixed" model; modules that need other prompts define their own."""
    import torch

    return torch.randint(3, 97, (2, 6), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def driver():
    """Headless Chromium. Skips only when Chromium is missing and DIFFUSIONLENS_REQUIRE_BROWSER is unset."""
    if not CHROMIUM.exists() and not os.environ.get("DIFFUSIONLENS_REQUIRE_BROWSER"):
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,900"):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    yield browser
    browser.quit()


@pytest.fixture(scope="module")
def open_page(driver):
    """`open_page(path)`: load a page of ours in the browser and wait until its script marks it ready."""
    from selenium.webdriver.support.ui import WebDriverWait

    def load(path: Path) -> None:
        driver.get(path.resolve().as_uri())
        WebDriverWait(driver, 10).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))

    return load
