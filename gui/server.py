"""Run the GUI under gunicorn (a production WSGI server), configured in code rather than a config file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication

from .app import create_app


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
    }
    if certfile:
        options.update(certfile=certfile, keyfile=keyfile)
    _GuiApplication(app, options).run()
