"""Browser tests: Playwright drives Debian's chromium (`playwright install` cannot download browsers here)."""

from __future__ import annotations

from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict) -> dict:
    return {
        **browser_type_launch_args,
        "executable_path": str(CHROMIUM),
        "headless": True,
        "args": ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage"],
    }


@pytest.fixture(scope="session")
def screenshots(test_output: Path) -> Path:
    path = test_output / "screenshots"
    path.mkdir(parents=True, exist_ok=True)
    return path
