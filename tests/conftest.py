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


_BROKERS = ("embedded", "mosquitto")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`@pytest.mark.broker("mosquitto")` on a module whose subject is the node, not the wire: its tests run on
    that broker only (the other where it is not installed, outside CI). Each such module on both brokers
    took the suite far past its 15 minutes (2026-11-30: 942 tests); the broker and wire modules keep both."""
    keep, drop = [], []
    for item in items:
        marker = item.get_closest_marker("broker")
        params = getattr(getattr(item, "callspec", None), "params", {})
        used = [v for v in params.values() if isinstance(v, str) and v in _BROKERS]
        if marker is None or not used:
            keep.append(item)
            continue
        wanted = marker.args[0]
        if wanted == "mosquitto" and not _NEEDS["mosquitto"]() and os.environ.get("FEDSILO_REQUIRE_ALL") != "1":
            wanted = "embedded"
        (keep if used[0] == wanted else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def test_output() -> Path:
    TEST_OUTPUT.mkdir(exist_ok=True)
    return TEST_OUTPUT
