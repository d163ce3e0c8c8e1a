"""A real headless Chromium (Debian's chromium + chromium-driver), driven by selenium, for the
/dashboard tests. `make test` and .ci/run install both with apt-get when root
(scripts/install_system_deps.sh); elsewhere the tests skip, saying so. As root a missing
browser is an error, not a skip: there the install step should have run."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
LAPTOP, PHONE = (1280, 800), (390, 844)


def chrome(size: tuple[int, int] = LAPTOP):
    """A headless Chromium showing `size` CSS pixels; quit() it when done."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        why = ("chromium and chromium-driver are not installed (make test and .ci/run install "
               "them: apt-get install chromium chromium-driver)")
        if os.geteuid() == 0:
            pytest.fail(why + "; running as root, so scripts/install_system_deps.sh should have")
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    # both Debian binaries named: selenium then looks up (or downloads) nothing of its own
    options.binary_location = CHROMIUM
    # --no-sandbox: Chromium refuses to run as root with its sandbox (CI runs as root)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--hide-scrollbars", f"--window-size={size[0]},{size[1]}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    set_viewport(driver, *size)
    return driver


def wait_until(driver, script: str, timeout: float = 20.0, what: str = ""):
    """Run `script` (a JS expression) until it returns something truthy; return that."""
    end = time.monotonic() + timeout
    while True:
        got = driver.execute_script(f"return ({script});")
        if got:
            return got
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what or script}; console: "
                                 f"{driver.get_log('browser')}")
        time.sleep(0.1)


def set_viewport(driver, width: int, height: int, mobile: bool = False) -> None:
    """The page's viewport in CSS pixels, through DevTools (headless Chromium keeps its window
    within a default screen size, so resizing the window cannot make it taller)."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})


def full_page_screenshot(driver, path: Path, width: int, mobile: bool = False) -> None:
    """The whole page, not only the first screen: the viewport is made as tall as the page."""
    set_viewport(driver, width, 600, mobile)
    time.sleep(0.3)                       # a layout at the new width
    height = driver.execute_script("return document.documentElement.scrollHeight")
    set_viewport(driver, width, height, mobile)
    time.sleep(0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
