"""The node's append-only audit log: who did what, when (plans, datasets, logins, rounds)."""

from __future__ import annotations

import csv
import io
import json
import uuid
from pathlib import Path
from typing import Any

from ._db import LockedDB, now_iso
from .config import node_paths

SCHEMA_VERSION = 1
EVENTS = (
    "plan_submitted",
    "plan_approved",
    "plan_rejected",
    "plan_revoked",
    "dataset_added",
    "dataset_updated",
    "dataset_removed",
    "login",
    "login_failed",
    "round_executed",
    "request_refused",
    "privacy_budget_set",
    "privacy_budget_cleared",
    "dataset_access_changed",
    "loading_plan_set",
    "loading_plan_cleared",
)


class AuditLog:
    """`record` appends; entries are never changed or removed."""

    TABLE = "events"

    def __init__(self, nodedir: str | Path) -> None:
        self._db = LockedDB(node_paths(nodedir).audit, "audit", SCHEMA_VERSION)

    def ensure(self) -> None:
        self._db.ensure()

    def record(self, event: str, actor: str, **details: Any) -> dict[str, Any]:
        if event not in EVENTS:
            raise ValueError(f"unknown audit event '{event}'; known: {', '.join(EVENTS)}")
        entry = {
            "id": uuid.uuid4().hex,
            "at": now_iso(),
            "event": event,
            "actor": actor,
            "details": json.loads(json.dumps(details, default=str)),
        }
        with self._db.write() as db:
            db.table(self.TABLE).insert(entry)
        return entry

    def list(
        self, event: str | None = None, actor: str | None = None, since: str | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """Entries oldest first, filtered; `since` is an ISO timestamp; `limit` keeps the latest N."""
        with self._db.read() as db:
            rows = [dict(r) for r in db.table(self.TABLE).all()]
        if event is not None:
            rows = [r for r in rows if r["event"] == event]
        if actor is not None:
            rows = [r for r in rows if r["actor"] == actor]
        if since is not None:
            rows = [r for r in rows if r["at"] >= since]
        rows.sort(key=lambda r: r["at"])
        if limit is not None:
            rows = rows[-limit:] if limit > 0 else []
        return rows

    @staticmethod
    def to_csv(rows: list[dict[str, Any]]) -> str:
        out = io.StringIO()
        w = csv.writer(out)
        w.writerow(["at", "event", "actor", "details"])
        for r in rows:
            w.writerow([r["at"], r["event"], r["actor"], json.dumps(r.get("details", {}), sort_keys=True)])
        return out.getvalue()
