"""Suite-wide settings: markers that need system packages skip where those are missing, except in
CI (FEDSILO_REQUIRE_ALL=1), where a missing broker or browser fails the build instead."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEST_OUTPUT = REPO / "test-output"

_NEEDS = {
    "mosquitto": lambda: bool(shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()),
    "browser": lambda: Path("/usr/bin/chromium").exists(),
    "wireguard": lambda: bool(shutil.which("wg")),
    "bwrap": lambda: bool(shutil.which("bwrap")),
}


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker, available in _NEEDS.items():
        if item.get_closest_marker(marker) and not available():
            message = f"needs {marker}, which is not installed (scripts/setup installs it as root)"
            if os.environ.get("FEDSILO_REQUIRE_ALL") == "1":
                pytest.fail(message)
            pytest.skip(message)


@pytest.fixture(scope="session")
def test_output() -> Path:
    TEST_OUTPUT.mkdir(exist_ok=True)
    return TEST_OUTPUT
