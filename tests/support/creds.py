"""Credentials files for tests that need no running network (the CLI only reads and stores them)."""

from __future__ import annotations

from pathlib import Path

from fedsilo.network.credentials import Credentials, FileStoreSettings, MqttSettings


def offline_credentials(path: Path, party: str, role: str = "node") -> Path:
    """Write credentials for `party` pointing at nothing reachable; returns the file."""
    Credentials(
        party=party,
        role=role,
        mqtt=MqttSettings(username=party, password="unused"),
        filestore=FileStoreSettings(url="http://127.0.0.1:9", token="unused"),
    ).save(path)
    return path
