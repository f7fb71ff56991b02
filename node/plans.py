"""The approval store (`NODEDIR/db/plans.json`): every plan a researcher sent, by sha256, and its status.

A plan's identity is the sha256 of its source exactly as shipped. Decisions (approve, reject, revoke)
are written to the AuditLog here with the deciding person, so callers do not record them again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tinydb import Query

from fedsilo.common.errors import FedsiloError
from fedsilo.common.hashing import sha256_bytes
from fedsilo.common.plan_source import CUSTOM_LOOP_WARNING, node_owned_in_source

from ._db import LockedDB, now_iso
from .audit import AuditLog
from .config import node_paths

SCHEMA_VERSION = 1
STATUSES = ("pending", "approved", "rejected")
MIN_PREFIX = 4


class PlanError(FedsiloError):
    """A plan decision is not possible as asked (wrong state, ambiguous prefix)."""


class UnknownPlan(PlanError, KeyError):
    """No plan with this hash or prefix."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown plan"


def custom_loop_flag(record: dict[str, Any], allowed: list[str]) -> str | None:
    """The reviewer's warning for a plan that defines methods the node's trainer owns (read from its source,
    never run), saying whether this node's `[node] allow_custom_loop` lets it train; None for a normal plan."""
    methods = node_owned_in_source(record["source"], record["name"])
    if not methods:
        return None
    verdict = (
        "this node allows it ([node] allow_custom_loop), but never under [dp] required"
        if record["sha256"] in allowed
        else "rounds with it are refused unless [node] allow_custom_loop lists its sha256"
    )
    return f"defines {', '.join(methods)}: {CUSTOM_LOOP_WARNING}; {verdict}"


class PlanStore:
    TABLE = "plans"

    def __init__(self, nodedir: str | Path) -> None:
        self._db = LockedDB(node_paths(nodedir).plans, "plans", SCHEMA_VERSION)
        self.audit = AuditLog(nodedir)

    def ensure(self) -> None:
        self._db.ensure()

    def submit(self, source: str, name: str, researcher: str, description: str = "") -> dict[str, Any]:
        """Store a plan as pending; a plan already known (same sha256) is returned unchanged."""
        sha = sha256_bytes(source)
        q = Query()
        now = now_iso()
        record = {
            "sha256": sha,
            "name": name,
            "source": source,
            "researcher": researcher,
            "description": description,
            "status": "pending",
            "first_seen": now,
            "decided_by": None,
            "decided_at": None,
            "note": "",
            "history": [{"action": "submitted", "by": researcher, "at": now, "note": ""}],
        }
        with self._db.write() as db:
            t = db.table(self.TABLE)
            existing = t.get(q.sha256 == sha)
            if existing is not None:
                return dict(existing)
            t.insert(record)
        self.audit.record("plan_submitted", f"researcher:{researcher}", plan_sha256=sha, name=name)
        return record

    def get(self, sha256_or_prefix: str) -> dict[str, Any]:
        key = (sha256_or_prefix or "").strip().lower()
        if len(key) < MIN_PREFIX:
            raise PlanError(f"give at least {MIN_PREFIX} characters of the plan's sha256")
        with self._db.read() as db:
            rows = [dict(r) for r in db.table(self.TABLE).all() if r["sha256"].startswith(key)]
        if not rows:
            raise UnknownPlan(f"no plan with sha256 starting '{key}'; `fedsilo node plan list` shows them")
        if len(rows) > 1:
            exact = [r for r in rows if r["sha256"] == key]
            if exact:
                return exact[0]
            raise PlanError(f"'{key}' matches {len(rows)} plans; give more characters of the sha256")
        return rows[0]

    def list(self, status: str | None = None) -> list[dict[str, Any]]:
        if status is not None and status not in STATUSES:
            raise PlanError(f"unknown status '{status}'; use one of: {', '.join(STATUSES)}")
        with self._db.read() as db:
            rows = [dict(r) for r in db.table(self.TABLE).all()]
        if status is not None:
            rows = [r for r in rows if r["status"] == status]
        return sorted(rows, key=lambda r: r["first_seen"])

    def status(self, sha256: str) -> str:
        """`unknown`, `pending`, `approved` or `rejected` for an exact sha256."""
        q = Query()
        with self._db.read() as db:
            row = db.table(self.TABLE).get(q.sha256 == sha256)
        return "unknown" if row is None else row["status"]

    def approve(self, sha: str, by: str, note: str = "") -> dict[str, Any]:
        return self._decide(sha, "approved", ("pending", "rejected"), "plan_approved", "approve", by, note)

    def reject(self, sha: str, by: str, note: str = "") -> dict[str, Any]:
        return self._decide(sha, "rejected", ("pending",), "plan_rejected", "reject", by, note)

    def revoke(self, sha: str, by: str, note: str = "") -> dict[str, Any]:
        """Withdraw an approval: the plan becomes rejected and the next round using it is refused."""
        return self._decide(sha, "rejected", ("approved",), "plan_revoked", "revoke", by, note)

    def previous_version(self, record: dict[str, Any]) -> dict[str, Any] | None:
        """The latest other plan with the same name seen before this one (for a diff). Versions first seen in the
        same millisecond are ordered as they were stored (`list` keeps that order among equal times): comparing
        the times alone made each the other's previous version."""
        rows = self.list()
        at = next((i for i, r in enumerate(rows) if r["sha256"] == record["sha256"]), None)
        before = rows[:at] if at is not None else [r for r in rows if r["first_seen"] <= record["first_seen"]]
        others = [r for r in before if r["name"] == record["name"] and r["sha256"] != record["sha256"]]
        return others[-1] if others else None

    def last_approved_version(self, record: dict[str, Any]) -> dict[str, Any] | None:
        """The other plan of the same name that this node approved most recently and still approves.

        The review baseline: a researcher may send several versions before anyone reviews, and only a
        diff against what the node already accepted shows every unreviewed change. A revoked approval
        does not count (the node no longer trusts that code). Its `decided_at`/`decided_by` say when and by whom.
        """
        approved = [
            r
            for r in self.list("approved")
            if r["name"] == record["name"] and r["sha256"] != record["sha256"] and r.get("decided_at")
        ]
        return max(approved, key=lambda r: r["decided_at"]) if approved else None

    def _decide(
        self, sha: str, new_status: str, allowed_from: tuple[str, ...], event: str, verb: str, by: str, note: str
    ) -> dict[str, Any]:
        full = self.get(sha)["sha256"]
        q = Query()
        now = now_iso()
        with self._db.write() as db:
            t = db.table(self.TABLE)
            row = t.get(q.sha256 == full)
            if row is None:  # removed between the lookup and the lock
                raise UnknownPlan(f"no plan with sha256 '{full}'")
            if row["status"] not in allowed_from:
                hint = (
                    " (use revoke to withdraw an approval)" if verb == "reject" and row["status"] == "approved" else ""
                )
                raise PlanError(f"cannot {verb} plan {full[:12]}: it is {row['status']}{hint}")
            history = [*row.get("history", []), {"action": verb, "by": by, "at": now, "note": note}]
            changes = {"status": new_status, "decided_by": by, "decided_at": now, "note": note, "history": history}
            t.update(changes, doc_ids=[row.doc_id])
            record = {**row, **changes}
        self.audit.record(event, by, plan_sha256=full, name=record["name"], note=note)
        return record
