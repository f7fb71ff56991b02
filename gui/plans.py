"""Training plans: list by status, review the exact source with a diff, approve, reject, revoke."""

from __future__ import annotations

import difflib
from functools import cache
from typing import Any

from flask import Blueprint, Response, abort, flash, g, redirect, render_template, request, url_for
from markupsafe import Markup, escape
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import PythonLexer

from fedsilo.node.plans import STATUSES, PlanError, UnknownPlan, custom_loop_flag

from .app import ctx, sentence
from .auth import writer_required

bp = Blueprint("plans", __name__)

_FORMATTER = HtmlFormatter(linenos="table", cssclass="highlight", lineanchors="L", anchorlinenos=True)
_VIEWS = ("approved", "previous")
_DECISIONS = {
    "approve": ("approved", "approve", "Plan {short} approved: it runs at the next round."),
    "reject": ("rejected", "reject", "Plan {short} rejected: rounds using it are refused."),
    "revoke": ("revoked", "revoke", "Approval of plan {short} revoked: rounds using it are refused from now on."),
}


@bp.route("/")
def home() -> Response:
    return redirect(url_for("plans.index"))


@bp.route("/plans")
def index() -> str:
    status = request.args.get("status", "pending")
    if status not in (*STATUSES, "all"):
        abort(404, f"Unknown plan status '{status}'.")
    plans = ctx().plans.list(None if status == "all" else status)
    plans.reverse()  # newest first: the one waiting for a decision is usually the latest
    counts = {s: 0 for s in STATUSES}
    for p in ctx().plans.list():
        counts[p["status"]] += 1
    return render_template("plans/index.html", plans=plans, status=status, counts=counts, statuses=STATUSES)


@bp.route("/plans/<sha>")
def detail(sha: str) -> str:
    """The plan's source and its changes: by default since the last version this node approved (so that
    unreviewed intermediate versions cannot hide a change), or since the previous version (`?diff=previous`)."""
    plan = _get_or_404(sha)
    previous = ctx().plans.previous_version(plan)
    approved = ctx().plans.last_approved_version(plan)
    views: dict[str, dict[str, Any]] = {}  # comparison -> baseline plan, in tab order
    if approved is not None:
        views["approved"] = approved
    if previous is not None and (approved is None or previous["sha256"] != approved["sha256"]):
        views["previous"] = previous  # a second view only when it is another version
    view = request.args.get("diff", "")
    if view not in _VIEWS and view:
        abort(404, f"Unknown comparison '{view}'; use diff=approved or diff=previous.")
    if view not in views:  # not asked, or the same baseline as the other view
        view = next(iter(views), "")
    base = views.get(view)
    return render_template(
        "plans/detail.html",
        plan=plan,
        source_html=Markup(highlight(plan["source"], PythonLexer(), _FORMATTER)),
        previous=previous,
        approved=approved,
        views=views,
        view=view,
        base=base,
        diff_html=_diff(base["source"], plan["source"], base["sha256"], plan["sha256"], view) if base else None,
        custom_loop=custom_loop_flag(plan, ctx().config.node.allow_custom_loop),
    )


@bp.route("/plans/<sha>/<action>", methods=["POST"])
@writer_required
def decide(sha: str, action: str) -> Response:
    if action not in _DECISIONS:
        abort(404)
    plan = _get_or_404(sha)
    note = request.form.get("note", "").strip()
    _, verb, done = _DECISIONS[action]
    if not note:
        flash(f"Write a note explaining why you {verb} this plan; it is kept in the activity log.", "error")
        return redirect(url_for("plans.detail", sha=plan["sha256"]))
    decide_fn = getattr(ctx().plans, action)
    try:
        decide_fn(plan["sha256"], by=f"gui:{g.user['username']}", note=note)
    except PlanError as exc:
        flash(f"Could not {verb} the plan: {sentence(exc)}", "error")
    else:
        flash(done.format(short=plan["sha256"][:12]), "success")
    return redirect(url_for("plans.detail", sha=plan["sha256"]))


@bp.route("/assets/pygments.css")
def pygments_css() -> Response:
    return Response(_pygments_css(), mimetype="text/css", headers={"Cache-Control": "public, max-age=86400"})


@cache
def _pygments_css() -> str:
    return _FORMATTER.get_style_defs(".highlight")


def _get_or_404(sha: str) -> dict[str, Any]:
    try:
        return ctx().plans.get(sha)
    except UnknownPlan:
        abort(404, f"No training plan with hash '{sha}' on this node.")
    except PlanError as exc:
        abort(404, str(exc))


def _diff(old: str, new: str, old_sha: str, new_sha: str, label: str = "previous") -> Markup:
    """A unified diff as escaped HTML lines, added and removed lines marked for the stylesheet."""
    lines = difflib.unified_diff(
        old.splitlines(),
        new.splitlines(),
        fromfile=f"{label} {old_sha[:12]}",
        tofile=f"this plan {new_sha[:12]}",
        lineterm="",
        n=3,
    )
    out = []
    for line in lines:
        if line.startswith(("+++", "---", "@@")):
            cls = "hunk"
        elif line.startswith("+"):
            cls = "add"
        elif line.startswith("-"):
            cls = "del"
        else:
            cls = ""
        text = escape(line) if line else Markup("&nbsp;")
        out.append(Markup('<span class="{}">{}</span>').format(cls, text) if cls else Markup("{}\n").format(text))
    return Markup("").join(out)
