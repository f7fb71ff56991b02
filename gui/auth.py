"""Login, logout, the current user, and the server-side rule that only admins and data managers change things."""

from __future__ import annotations

import functools
import hmac
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, Flask, abort, flash, g, redirect, render_template, request, session, url_for
from werkzeug.wrappers import Response

from .app import ctx
from .users import WRITER_ROLES

bp = Blueprint("auth", __name__)

# Reachable without a session.
_PUBLIC_ENDPOINTS = frozenset({"auth.login", "static", "plans.pygments_css"})
# POSTs any logged-in user may make, whatever the role.
_ANY_ROLE_POST = frozenset({"auth.logout"})


def install(app: Flask) -> None:
    app.before_request(_load_user)
    app.context_processor(lambda: {"user": g.get("user"), "can_write": _can_write()})


def _can_write() -> bool:
    user = g.get("user")
    return bool(user and user["role"] in WRITER_ROLES)


def _load_user() -> Response | None:
    g.user = None
    username = session.get("user")
    if username:
        record = ctx().users.get(username)
        # The token changes at logout and password reset, so a copied cookie stops working then.
        token = str(session.get("token", ""))
        if record is not None and hmac.compare_digest(str(record.get("session_token", "")), token):
            g.user = record
        else:
            session.clear()
    if request.endpoint in _PUBLIC_ENDPOINTS:
        return None
    if g.user is None:
        if request.method == "GET":
            return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))
        abort(401)
    changes = request.method not in ("GET", "HEAD", "OPTIONS") and request.endpoint not in _ANY_ROLE_POST
    if changes and not _can_write():
        abort(403, "Your account can view this node but not change it. Ask an administrator for the data manager role.")
    return None


def writer_required(view: Callable[..., Any]) -> Callable[..., Any]:
    """Refuse the view (403) unless the user is an admin or a data manager."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not _can_write():
            abort(403, "Only administrators and data managers may do this.")
        return view(*args, **kwargs)

    return wrapper


@bp.route("/login", methods=["GET", "POST"])
def login() -> str | Response | tuple[str, int]:
    if g.user is not None and request.method == "GET":
        return redirect(url_for("plans.index"))
    next_url = _safe_next(request.values.get("next", ""))
    if request.method == "GET":
        return render_template("login.html", next=next_url)
    username = request.form.get("username", "").strip()
    password = request.form.get("password", "")
    if not username or not password:
        flash("Enter your username and your password.", "error")
        return render_template("login.html", next=next_url, username=username), 400
    client = request.remote_addr or "unknown"
    result = ctx().users.authenticate(username, password, client)
    audit = ctx().audit
    if not result.ok:
        audit.record("login_failed", username, ip=client, locked=bool(result.locked_for))
        if result.locked_for:
            minutes = max(1, round(result.locked_for / 60))
            flash(
                f"Too many failed attempts. Logging in as '{username}' from this computer is blocked for about "
                f"{minutes} minute(s).",
                "error",
            )
            return render_template("login.html", next=next_url, username=username), 429
        flash("Wrong username or password.", "error")
        return render_template("login.html", next=next_url, username=username), 401
    user = result.user
    assert user is not None
    session.clear()
    session.permanent = True
    session["user"] = user["username"]
    session["token"] = user["session_token"]
    audit.record("login", user["username"], ip=client)
    flash(f"Logged in as {user['username']} ({user['role'].replace('_', ' ')}).", "success")
    return redirect(next_url or url_for("plans.index"))


@bp.route("/logout", methods=["POST"])
def logout() -> Response:
    ctx().users.end_sessions(g.user["username"])
    session.clear()
    flash("You are logged out.", "success")
    return redirect(url_for("auth.login"))


def _safe_next(target: str) -> str:
    """Only same-site paths, so the login page cannot be used to redirect elsewhere."""
    parts = urlsplit(target)
    if not target.startswith("/") or target.startswith("//") or parts.scheme or parts.netloc or "\\" in target:
        return ""
    return target
