"""Activity: the node's audit log, filterable by event, person and date, exportable to CSV."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

from flask import Blueprint, Response, flash, render_template, request

from fedsilo.node.audit import EVENTS

from .app import ctx

bp = Blueprint("activity", __name__, url_prefix="/activity")

PAGE_LIMIT = 500


def _filtered() -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Entries newest first matching the query string, and the filters as given (to refill the form)."""
    filters = {k: request.args.get(k, "").strip() for k in ("event", "actor", "since", "until")}
    event = filters["event"] or None
    if event is not None and event not in EVENTS:
        flash(f"Unknown event '{event}'; showing all events.", "error")
        filters["event"], event = "", None
    since = _day(filters, "since")
    until = _day(filters, "until")
    rows = ctx().audit.list(event=event, actor=filters["actor"] or None, since=since.isoformat() if since else None)
    if until is not None:
        # Timestamps are ISO strings, so "before the next day" keeps the whole 'until' day.
        end = (until + timedelta(days=1)).isoformat()
        rows = [r for r in rows if r["at"] < end]
    rows.reverse()
    return rows, filters


def _day(filters: dict[str, str], key: str) -> date | None:
    text = filters[key]
    if not text:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        flash(f"'{text}' is not a date (YYYY-MM-DD); the '{key}' filter was ignored.", "error")
        filters[key] = ""
        return None


@bp.route("/")
def index() -> str:
    rows, filters = _filtered()
    return render_template(
        "activity.html", rows=rows[:PAGE_LIMIT], total=len(rows), limit=PAGE_LIMIT, filters=filters, events=EVENTS
    )


@bp.route("/export.csv")
def export() -> Response:
    rows, _ = _filtered()
    rows.reverse()  # the CSV reads oldest first, like the log itself
    stamp = date.today().isoformat()
    return Response(
        ctx().audit.to_csv(rows),
        mimetype="text/csv",
        headers={"Content-Disposition": f'attachment; filename="fedsilo-activity-{stamp}.csv"'},
    )
