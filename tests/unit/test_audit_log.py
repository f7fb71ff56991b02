"""The audit log as an append-only JSON-lines file: appends never rewrite it, several processes append at once,
an old node's TinyDB log is converted, and a torn or foreign file is handled."""

from __future__ import annotations

import json
import multiprocessing as mp
import os

import pytest

from fedsilo.node._db import LockedDB, SchemaMismatch
from fedsilo.node.audit import AuditLog
from fedsilo.node.config import node_paths


@pytest.fixture
def nodedir(tmp_path):
    node_paths(tmp_path).audit.parent.mkdir(parents=True)
    return tmp_path


def test_a_record_appends_without_rewriting_what_is_there(nodedir) -> None:
    audit = AuditLog(nodedir)
    audit.record("login", "gui:ann", ip="127.0.0.1")
    before = audit.path.read_bytes()
    inode = audit.path.stat().st_ino
    audit.record("round_executed", "researcher:r", round=1)
    after = audit.path.read_bytes()
    assert audit.path.stat().st_ino == inode and after.startswith(before)  # the same file, grown at its end
    assert [json.loads(line)["event"] for line in after.splitlines()[1:]] == ["login", "round_executed"]


def _append_many(nodedir: str, who: int) -> None:
    audit = AuditLog(nodedir)
    for i in range(40):
        audit.record("round_executed", f"researcher:{who}", round=i, padding="x" * 3000)


def test_processes_appending_at_once_lose_no_entry(nodedir) -> None:
    AuditLog(nodedir).ensure()
    procs = [mp.get_context("fork").Process(target=_append_many, args=(str(nodedir), w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    rows = AuditLog(nodedir).list()
    assert len(rows) == 160 and len({r["id"] for r in rows}) == 160
    assert all(len(r["details"]["padding"]) == 3000 for r in rows)


def test_an_old_tinydb_log_is_converted_once_in_order(nodedir) -> None:
    old = node_paths(nodedir).audit
    with LockedDB(old, "audit", 1).write() as db:
        db.table("events").insert({"id": "b", "at": "2026-01-02T00:00:00.000+00:00", "event": "login", "actor": "x",
                                   "details": {}})  # fmt: skip
        db.table("events").insert({"id": "a", "at": "2026-01-01T00:00:00.000+00:00", "event": "plan_approved",
                                   "actor": "y", "details": {"plan_sha256": "s"}})  # fmt: skip
    audit = AuditLog(nodedir)
    assert [r["id"] for r in audit.list()] == ["a", "b"]
    assert not old.exists() and old.with_name(old.name + ".migrated").is_file()
    audit.record("login", "z")
    assert [r["id"] for r in AuditLog(nodedir).list()][:2] == ["a", "b"] and len(audit.list()) == 3


def test_a_line_torn_by_a_crash_is_skipped_and_the_log_goes_on(nodedir) -> None:
    audit = AuditLog(nodedir)
    audit.record("login", "gui:ann")
    with open(audit.path, "a", encoding="utf-8") as f:
        f.write('{"id": "torn", "at": "2026')  # a process killed in the middle of its write
    audit.record("login", "gui:bob")  # starts a line of its own: only the torn line is lost
    audit.record("login", "gui:eve")
    assert [r["actor"] for r in audit.list()] == ["gui:ann", "gui:bob", "gui:eve"]


def test_a_file_that_is_not_an_audit_log_is_refused(nodedir) -> None:
    audit = AuditLog(nodedir)
    audit.path.write_text('{"store": "datasets", "schema_version": 2}\n', encoding="utf-8")
    with pytest.raises(SchemaMismatch, match="not a fedsilo audit log"):
        audit.record("login", "x")
    audit.path.write_text('{"store": "audit", "schema_version": 9}\n', encoding="utf-8")
    with pytest.raises(SchemaMismatch, match="schema version 9"):
        audit.list()
    assert os.path.getsize(audit.path) > 0  # nothing overwritten
