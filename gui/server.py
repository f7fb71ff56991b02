"""Run the GUI under gunicorn (a production WSGI server), configured in code rather than a config file."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication

from .app import create_app

CONTROL_SOCKET = "gui.ctl"
# sockaddr_un.sun_path holds 108 bytes on Linux, the terminating NUL included.
_SUN_PATH_MAX = 107


def control_socket_options(nodedir: Path) -> dict[str, Any]:
    """gunicorn's control socket (`gunicornc -s PATH`) for this GUI only: NODEDIR/gui.ctl.

    gunicorn's default is one path per user ($XDG_RUNTIME_DIR or ~/.gunicorn/gunicorn.ctl), so a
    second GUI removed the first one's socket and took the path over. A node directory too deep for
    a Unix socket path gets no control socket (said on stderr); the GUI serves the same either way.
    """
    path = (nodedir / CONTROL_SOCKET).resolve()
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        print(f"fedsilo gui: no control socket ({path} is longer than a Unix socket path may be)", file=sys.stderr)
        return {"control_socket_disable": True}
    return {"control_socket": str(path), "control_socket_mode": 0o600}


class _GuiApplication(BaseApplication):
    def __init__(self, app: Flask, options: dict[str, Any]) -> None:
        self._app = app
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        return self._app


def serve(
    nodedir: Path,
    *,
    host: str,
    port: int,
    workers: int = 2,
    certfile: str | None = None,
    keyfile: str | None = None,
    secure_cookies: bool = False,
) -> None:
    """Build the app once (configuration errors surface before any worker forks) and serve it."""
    app = create_app(nodedir, secure_cookies=secure_cookies)
    options: dict[str, Any] = {
        "bind": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        "workers": workers,
        "worker_class": "gthread",
        "threads": 4,
        "timeout": 60,
        "graceful_timeout": 10,
        "accesslog": "-",
        "errorlog": "-",
        "loglevel": "info",
        "proc_name": f"fedsilo-gui:{nodedir.name}",
        **control_socket_options(nodedir),
    }
    if certfile:
        options.update(certfile=certfile, keyfile=keyfile)
    _GuiApplication(app, options).run()
