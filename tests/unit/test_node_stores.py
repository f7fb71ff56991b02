"""The node's stores on real TinyDB files: datasets, plans, audit, schema checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedsilo.common.hashing import sha256_bytes
from fedsilo.node._db import SchemaMismatch
from fedsilo.node.audit import AuditLog
from fedsilo.node.config import NodeConfig, node_paths
from fedsilo.node.datasets import DatasetError, DatasetStore, UnknownDataset
from fedsilo.node.plans import PlanError, PlanStore, UnknownPlan


@pytest.fixture
def nodedir(tmp_path: Path) -> Path:
    d = tmp_path / "node"
    data = tmp_path / "data"
    data.mkdir()
    NodeConfig.create(d, {"node": {"name": "n1", "node_id": "n1", "data_roots": [str(data)]}}).save()
    return d


@pytest.fixture
def csv_file(nodedir: Path) -> Path:
    p = nodedir.parent / "data" / "t.csv"
    p.write_text("x,y,label\n1,2.5,0\n3,4.5,1\n5,0.5,1\n")
    return p


def test_config_roundtrip_and_errors(nodedir):
    cfg = NodeConfig.load(nodedir)
    assert cfg.node.require_approval is True and cfg.limits.allow_gpu is False
    text = node_paths(nodedir).config.read_text().replace("require_approval = true", "require_approval = 3")
    node_paths(nodedir).config.write_text(text)
    with pytest.raises(Exception, match=r"node\.require_approval"):
        NodeConfig.load(nodedir)
    with pytest.raises(Exception, match=r"dp"):
        NodeConfig.create(nodedir, {"node": {"name": "a", "node_id": "a"}, "dp": {"required": True}})


def test_dataset_add_summary_search_info(nodedir, csv_file):
    store = DatasetStore(nodedir)
    rec = store.add("tab", ["csv", "demo", "csv"], "csv", csv_file, description="d", target="label")
    assert rec["tags"] == ["csv", "demo"] and rec["shape"] == [3, 3]
    y = {"type": "numeric", "dtype": "float64", "min": 0.5, "max": 4.5, "mean": 2.5}
    assert rec["summary"]["columns"]["y"] == y
    assert rec["summary"]["columns"]["x"]["dtype"] == "int64"
    assert store.get("tab")["dataset_id"] == rec["dataset_id"] == store.get(rec["dataset_id"])["dataset_id"]
    assert [r["name"] for r in store.search(["csv"])] == ["tab"]
    assert store.search(["csv", "other"]) == []
    info = store.info(rec)
    assert "path" not in info.model_dump()
    store.update(rec["dataset_id"], tags=["new"], by="gui:ann")
    assert store.get("tab")["tags"] == ["new"]
    store.remove("tab", by="cli:bob")
    with pytest.raises(UnknownDataset):
        store.get("tab")
    events = [(e["event"], e["actor"]) for e in AuditLog(nodedir).list()]
    assert events == [("dataset_added", "cli"), ("dataset_updated", "gui:ann"), ("dataset_removed", "cli:bob")]


def test_dataset_validation(nodedir, csv_file, tmp_path):
    store = DatasetStore(nodedir)
    with pytest.raises(DatasetError, match="does not exist"):
        store.add("a", ["t"], "csv", nodedir.parent / "data" / "missing.csv")
    outside = tmp_path / "outside.csv"
    outside.write_text("a,label\n1,0\n")
    with pytest.raises(DatasetError, match="outside the node's data roots"):
        store.add("a", ["t"], "csv", outside)
    with pytest.raises(DatasetError, match="outside"):
        store.add("a", ["t"], "csv", nodedir.parent / "data" / ".." / "outside.csv")
    link = nodedir.parent / "data" / "link.csv"
    link.symlink_to(outside)
    with pytest.raises(DatasetError, match="resolves to"):
        store.add("a", ["t"], "csv", link)
    with pytest.raises(DatasetError, match="tag"):
        store.add("a", [" ", ""], "csv", csv_file)
    with pytest.raises(DatasetError, match="needs a folder"):
        store.add("a", ["t"], "images", csv_file)
    with pytest.raises(DatasetError, match="unknown data type"):
        store.add("a", ["t"], "parquet", csv_file)
    with pytest.raises(DatasetError, match="target column"):
        store.add("a", ["t"], "csv", csv_file, target="nope")
    store.add("a", ["t"], "csv", csv_file)
    with pytest.raises(DatasetError, match="already exists"):
        store.add("a", ["u"], "csv", csv_file)


def test_image_dataset_class_counts(nodedir):
    from PIL import Image

    root = nodedir.parent / "data" / "imgs"
    for cls, n in (("a", 1), ("b", 2)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("L", (4, 5)).save(root / cls / f"{i}.png")
    rec = DatasetStore(nodedir).add("im", ["img"], "images", root)
    assert rec["summary"]["classes"] == {"a": 1, "b": 2}
    assert rec["shape"] == [3, 1, 5, 4]


def test_plan_lifecycle(nodedir):
    store = PlanStore(nodedir)
    src = "class P: pass\n"
    sha = sha256_bytes(src)
    assert store.status(sha) == "unknown"
    rec = store.submit(src, "P", "alice", "first")
    assert rec["status"] == "pending" and store.status(sha) == "pending"
    assert store.submit(src, "P", "alice")["first_seen"] == rec["first_seen"]
    store.approve(sha[:8], "cli:bob")
    with pytest.raises(PlanError, match="revoke"):
        store.reject(sha[:8], "cli:bob")
    assert store.status(sha) == "approved"
    with pytest.raises(PlanError, match="it is approved"):
        store.approve(sha, "cli:bob")
    store.revoke(sha[:6], "cli:bob", note="leaks ids")
    assert store.get(sha)["status"] == "rejected" and store.get(sha)["note"] == "leaks ids"
    store.approve(sha, "cli:bob")
    src2 = "class P: x = 1\n"
    rec2 = store.submit(src2, "P", "alice")
    assert store.previous_version(rec2)["sha256"] == sha
    store.reject(rec2["sha256"], "gui:carol", note="no")
    assert [r["sha256"] for r in store.list(status="rejected")] == [rec2["sha256"]]
    with pytest.raises(UnknownPlan):
        store.get("ffff" if not sha.startswith("ffff") else "0000")
    with pytest.raises(PlanError, match="at least"):
        store.get("ab")
    events = [e["event"] for e in AuditLog(nodedir).list()]
    assert events == [
        "plan_submitted",
        "plan_approved",
        "plan_revoked",
        "plan_approved",
        "plan_submitted",
        "plan_rejected",
    ]
    history = [h["action"] for h in store.get(sha)["history"]]
    assert history == ["submitted", "approve", "revoke", "approve"]


def test_audit_filters_and_csv(nodedir):
    audit = AuditLog(nodedir)
    audit.record("login", "gui:ann", ip="127.0.0.1")
    audit.record("login_failed", "gui:eve")
    audit.record("round_executed", "node", job="j", round=1, outcome="ok")
    assert [r["actor"] for r in audit.list(event="login")] == ["gui:ann"]
    assert len(audit.list(limit=2)) == 2 and audit.list(limit=1)[0]["event"] == "round_executed"
    assert audit.list(actor="gui:eve")[0]["event"] == "login_failed"
    assert "round_executed" in audit.to_csv(audit.list())
    with pytest.raises(ValueError, match="unknown audit event"):
        audit.record("nope", "x")


def test_schema_version_checked(nodedir, csv_file):
    store = DatasetStore(nodedir)
    store.add("a", ["t"], "csv", csv_file)
    path = node_paths(nodedir).datasets
    data = json.loads(path.read_text())
    data["_meta"]["1"]["schema_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(SchemaMismatch, match="schema version 99"):
        store.list()
    with pytest.raises(SchemaMismatch):
        DatasetStore(nodedir).add("b", ["t"], "csv", csv_file)


def test_no_stale_reads_across_instances(nodedir, csv_file):
    a, b = DatasetStore(nodedir), DatasetStore(nodedir)
    assert b.list() == []
    a.add("x", ["t"], "csv", csv_file)
    assert [r["name"] for r in b.list()] == ["x"]


def test_a_read_context_reads_its_file_once_and_sees_one_snapshot(tmp_path: Path, monkeypatch) -> None:
    """`LockedDB.read()`: every query of one context sees the file as it was at the first, another writer's
    change shows in the next context, and a write inside a read context is refused."""
    from tinydb import Query

    from fedsilo.node import _db

    db = _db.LockedDB(tmp_path / "s.json", "demo", 1)
    with db.write() as w:
        w.table("rows").insert({"k": "a", "v": 1})
    reads: list[type] = []
    original = _db.AtomicJSONStorage.read

    def counted(self):  # type: ignore[no-untyped-def]
        reads.append(type(self))
        return original(self)

    monkeypatch.setattr(_db.AtomicJSONStorage, "read", counted)
    with db.read() as r:
        assert r.table("rows").get(Query().k == "a")["v"] == 1
        with _db.LockedDB(tmp_path / "s.json", "demo", 1).write() as other:  # another process, say
            other.table("rows").update({"v": 2}, Query().k == "a")
        assert r.table("rows").get(Query().k == "a")["v"] == 1  # the same snapshot within the context
        assert len(r.table("rows").all()) == 1
        with pytest.raises(_db.StoreError, match="read-only"):
            r.table("rows").insert({"k": "b"})
        assert [row["k"] for row in r.table("rows").all()] == ["a"]  # the refused row is nowhere
    assert reads.count(_db.SnapshotJSONStorage) == 2  # one read for the queries, one after the refused write
    with db.read() as r:
        assert r.table("rows").get(Query().k == "a")["v"] == 2 and len(r.table("rows").all()) == 1
