"""Node status: is the daemon running, is it connected to the broker, what the node's configuration says."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from flask import Blueprint, render_template

from fedsilo.node.config import node_paths

from .app import ctx

bp = Blueprint("status", __name__, url_prefix="/status")


def read_status(nodedir: Path) -> dict[str, Any]:
    """The daemon's status.json with `online` and a readable `state`; the daemon removes the file on a clean stop."""
    path = node_paths(nodedir).status
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"online": False, "state": "not running (no status file: the daemon is stopped)"}
    except (OSError, ValueError) as exc:
        return {"online": False, "state": f"unknown (cannot read {path.name}: {exc})"}
    pid = data.get("pid")
    alive = isinstance(pid, int) and _process_alive(pid)
    data["online"] = alive
    data["state"] = "running" if alive else f"not running (process {pid} is gone: it stopped without cleaning up)"
    return data


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        # The pid may have been reused by an unrelated process since the daemon died.
        try:
            return b"fedsilo" in cmdline.read_bytes()
        except OSError:
            return True
    return True


@bp.route("/")
def index() -> str:
    c = ctx()
    status = read_status(c.nodedir)
    config = c.config.model_dump(mode="json")
    return render_template(
        "status.html",
        status=status,
        config=config,
        nodedir=c.nodedir,
        counts={
            "datasets": len(c.datasets.list()),
            "pending": len(c.plans.list("pending")),
            "approved": len(c.plans.list("approved")),
        },
    )
