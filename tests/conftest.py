"""Fixtures shared by the browser tests (the trajectory viewer and the attention viewer)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


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
