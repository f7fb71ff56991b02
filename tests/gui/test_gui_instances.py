"""Two `fedsilo gui start` on two node directories, side by side: each keeps its own gunicorn control
socket (NODEDIR/gui.ctl) and keeps serving when the other stops."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from gunicorn.ctl.client import ControlClient

from tests.support.creds import offline_credentials
from tests.support.procs import wait_until

from .helpers import GuiServer, init_node, make_data, start_gui


def _arbiter_pid(nodedir: Path) -> int:
    with ControlClient(str(nodedir / "gui.ctl"), timeout=10) as client:
        return client.send_command("show stats")["pid"]


def _serves(gui: GuiServer) -> bool:
    with urllib.request.urlopen(gui.url + "/login", timeout=10) as resp:
        return resp.status == 200


def test_two_guis_each_keep_their_control_socket_and_serve(tmp_path: Path) -> None:
    data, _ = make_data(tmp_path)
    guis: dict[str, GuiServer] = {}
    dirs = {}
    try:
        for name in ("hospital-a", "hospital-b"):
            dirs[name] = tmp_path / name
            init_node(dirs[name], name, offline_credentials(tmp_path / f"{name}.json", name), data)
            gui = guis[name] = start_gui(dirs[name], tmp_path / f"{name}-gui.log")
            # gunicorn opens the control socket once its workers are forked, which may be after they answer
            sock = dirs[name] / "gui.ctl"
            wait_until(sock.exists, gui.proc, gui.log_path, 30, f"{name}'s control socket")
        a, b = guis["hospital-a"], guis["hospital-b"]
        # each socket reaches its own GUI's gunicorn arbiter (the `fedsilo gui start` process itself)
        assert _arbiter_pid(dirs["hospital-a"]) == a.proc.pid
        assert _arbiter_pid(dirs["hospital-b"]) == b.proc.pid
        assert (dirs["hospital-a"] / "gui.ctl").stat().st_mode & 0o077 == 0  # owner only

        b.stop()  # the second one going away takes nothing of the first with it
        assert _serves(a)
        assert _arbiter_pid(dirs["hospital-a"]) == a.proc.pid
        assert not (dirs["hospital-b"] / "gui.ctl").exists()
    finally:
        for gui in guis.values():
            gui.stop()
