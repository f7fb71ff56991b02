"""The Flask application factory: configuration, security settings, blueprints, error pages."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from filelock import FileLock
from flask import Flask, Response, current_app, flash, render_template, request
from flask_wtf.csrf import CSRFError, CSRFProtect
from werkzeug.exceptions import HTTPException

from fedsilo.node.audit import AuditLog
from fedsilo.node.config import NodeConfig
from fedsilo.node.datasets import DatasetStore
from fedsilo.node.plans import PlanStore

from .users import UserStore

SESSION_LIFETIME = timedelta(hours=8)

# Every asset comes from this app (hospitals may be offline), and the pages run no script at all.
_CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)


@dataclass(frozen=True)
class GuiContext:
    """The node this GUI serves and the stores it goes through (the same classes as the CLI and daemon)."""

    nodedir: Path
    config: NodeConfig
    users: UserStore
    datasets: DatasetStore
    plans: PlanStore
    audit: AuditLog

    @classmethod
    def build(cls, nodedir: Path, config: NodeConfig) -> GuiContext:
        return cls(nodedir, config, UserStore(nodedir), DatasetStore(nodedir), PlanStore(nodedir), AuditLog(nodedir))


class _PerProcess:
    """Stores are made in each gunicorn worker: their file locks must not be inherited across fork."""

    def __init__(self, nodedir: Path, config: NodeConfig) -> None:
        self.nodedir, self.config = nodedir, config
        self._pid = -1
        self._ctx: GuiContext | None = None

    def get(self) -> GuiContext:
        if self._ctx is None or self._pid != os.getpid():
            self._ctx = GuiContext.build(self.nodedir, self.config)
            self._pid = os.getpid()
        return self._ctx


def ctx() -> GuiContext:
    return current_app.extensions["fedsilo"].get()


def sentence(text: object) -> str:
    """An error message ending with exactly one full stop, for flash messages."""
    return str(text).rstrip(" .") + "."


def create_app(nodedir: str | Path, *, secure_cookies: bool = False) -> Flask:
    """Build the GUI for one node directory; raises ConfigError when the node config is invalid."""
    nodedir = Path(nodedir).resolve()
    config = NodeConfig.load(nodedir)
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=_secret_key(nodedir),
        SESSION_COOKIE_NAME="fedsilo_gui_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=secure_cookies,
        PERMANENT_SESSION_LIFETIME=SESSION_LIFETIME,
        WTF_CSRF_TIME_LIMIT=int(SESSION_LIFETIME.total_seconds()),
        MAX_CONTENT_LENGTH=1024 * 1024,
        TEMPLATES_AUTO_RELOAD=False,
    )
    app.extensions["fedsilo"] = _PerProcess(nodedir, config)
    CSRFProtect(app)

    from . import activity, auth, budget, datasets, plans, status

    for module in (auth, datasets, plans, activity, budget, status):
        app.register_blueprint(module.bp)
    auth.install(app)

    app.jinja_env.globals["node_name"] = config.node.name
    app.jinja_env.filters.update(when=_when, event_class=_event_class, detail=_detail)
    app.after_request(_security_headers)
    app.register_error_handler(CSRFError, _csrf_error)
    app.register_error_handler(HTTPException, _http_error)
    return app


def _secret_key(nodedir: Path) -> str:
    """Read (or make once) the key that signs session cookies; shared by all workers, kept across restarts."""
    path = nodedir / "db" / "gui_secret.key"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=10):
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        return path.read_text().strip()


def _security_headers(response: Response) -> Response:
    response.headers.setdefault("Content-Security-Policy", _CSP)
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "same-origin"
    if request.endpoint != "static":
        response.headers["Cache-Control"] = "no-store"
    return response


def _csrf_error(exc: CSRFError) -> tuple[str, int]:
    flash(
        "The form was refused because its security token was missing or expired. Reload the page and submit it again.",
        "error",
    )
    return render_template("error.html", code=400, title="Form refused"), 400


_TITLES = {
    400: "Bad request",
    403: "Not allowed",
    404: "Not found",
    405: "Method not allowed",
    413: "Request too large",
    500: "Server error",
}


def _http_error(exc: HTTPException) -> tuple[str, int]:
    code = exc.code or 500
    return render_template("error.html", code=code, title=_TITLES.get(code, "Error"), message=exc.description), code


def _when(value: str | None) -> str:
    """An ISO timestamp as 'YYYY-MM-DD HH:MM UTC' (what a person reads; the <time> tag keeps the exact value)."""
    if not value:
        return "—"
    try:
        stamp = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return str(value)
    zone = " UTC" if stamp.utcoffset() is not None and not stamp.utcoffset() else ""
    return stamp.strftime("%Y-%m-%d %H:%M") + zone


def _event_class(event: str) -> str:
    if event in ("plan_rejected", "plan_revoked", "login_failed", "dataset_removed"):
        return "badge-rejected"
    if event in ("plan_approved", "login", "dataset_added"):
        return "badge-approved"
    return "badge-pending"


def _detail(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    text = str(value)
    # Hashes are identified by their first characters everywhere else in the GUI.
    if len(text) == 64 and all(c in "0123456789abcdef" for c in text):
        return text[:12] + "…"
    return text
