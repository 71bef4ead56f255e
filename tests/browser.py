"""Headless Chromium (Debian's ``chromium`` + ``chromium-driver``) through Selenium, for the pages omniserve
serves or writes: the playground (tests/test_playground.py) and the HTML reports (tests/test_html_report.py).

``scripts/test-all.sh`` installs both packages; where they are missing the browser tests skip, saying so.
Screenshots go to ``test-output/`` at the repository root (git-ignored), for people to look at.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "test-output"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

#: Flags that run Chromium here: no sandbox (containers), no GPU, nothing fetched from Google in the background.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,860",
)


@contextmanager
def chromium() -> Iterator[Any]:
    """A fresh headless Chromium (its own profile folder) whose console messages ``console()`` returns."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="omniserve-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def console(driver: Any) -> list[dict[str, Any]]:
    """The console messages since the last call (Chromium hands each message out once)."""
    return list(driver.get_log("browser"))


def errors(messages: list[dict[str, Any]]) -> list[str]:
    """The messages Chromium logs as errors: script errors, refused resources, failed loads, CSP violations."""
    return [m["message"] for m in messages if m["level"] == "SEVERE"]


def screenshot(driver: Any, name: str) -> Path:
    SCREENSHOTS.mkdir(exist_ok=True)
    path = SCREENSHOTS / name
    driver.save_screenshot(str(path))
    return path
