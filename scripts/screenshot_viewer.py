"""Regenerate docs/viewer.png: the HTML trajectory viewer on the toy model, in headless Chromium.

python scripts/screenshot_viewer.py [--prompt "squares 400 800:"] [--seed 0] [--out docs/viewer.png]

Needs selenium (dev extras) and Chromium with its driver (Debian: apt-get install chromium chromium-driver).
The slider is moved to the middle step and one position is hovered, so the top-k tooltip shows.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By

from diffusionlens import HookedDiffusionGemma, ReplayNoise
from diffusionlens.viz import write_viewer

ROOT = Path(__file__).resolve().parents[1]


def chromium(width: int, height: int, binary: str = "/usr/bin/chromium", driver: str = "/usr/bin/chromedriver"):
    """A headless Chromium driven by selenium, with no network access needed."""
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument(f"--window-size={width},{height}")
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default="squares 400 800:")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "viewer.png")
    args = parser.parse_args()

    model = HookedDiffusionGemma.from_pretrained("toy", progress=False)
    result = model.generate(
        model.to_tokens(args.prompt),
        max_new_tokens=model.cfg.canvas_length,
        noise=ReplayNoise(args.seed),
        record_top_k=5,
        progress=False,
    )
    steps = result.trace.steps(0)
    middle = steps // 2
    with tempfile.TemporaryDirectory() as tmp:
        page = write_viewer(result.trace, model.tokenizer, Path(tmp) / "viewer.html", title=args.prompt)
        driver = chromium(1100, 560)
        try:
            driver.get(page.as_uri())
            slider = driver.find_element(By.ID, "step-slider")
            driver.execute_script(
                "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'));", slider, middle
            )
            cells = driver.find_elements(By.CSS_SELECTOR, ".cell[data-position]")
            ActionChains(driver).move_to_element(cells[min(len(cells) - 1, 5)]).perform()
            args.out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(args.out))
        finally:
            driver.quit()
    print(f"wrote {args.out} (step {middle} of {steps})")


if __name__ == "__main__":
    main()
