"""The review baseline on a real plan store: the last version this node approved, not merely the previous one."""

from __future__ import annotations

from pathlib import Path

from fedsilo.node.config import NodeConfig
from fedsilo.node.plans import PlanStore

V1 = "class P:\n    lr = 1\n"
V2 = "class P:\n    lr = 1\n    exfiltrate = True\n"
V3 = "class P:\n    lr = 2\n    exfiltrate = True\n"


def _store(tmp_path: Path) -> PlanStore:
    nodedir = tmp_path / "node"
    NodeConfig.create(nodedir, {"node": {"name": "n1", "node_id": "n1"}}).save()
    return PlanStore(nodedir)


def test_two_unreviewed_versions_are_compared_with_the_approved_one(tmp_path: Path) -> None:
    store = _store(tmp_path)
    v1 = store.submit(V1, "P", "researcher")
    store.approve(v1["sha256"], by="gui:alice", note="baseline")
    v2 = store.submit(V2, "P", "researcher")
    v3 = store.submit(V3, "P", "researcher")
    store.submit("class Q:\n    pass\n", "Q", "researcher")  # another name never counts

    assert store.previous_version(v3)["sha256"] == v2["sha256"]  # the unreviewed one
    baseline = store.last_approved_version(v3)
    assert baseline is not None and baseline["sha256"] == v1["sha256"]
    assert baseline["decided_by"] == "gui:alice" and baseline["decided_at"]
    assert store.last_approved_version(v1) is None  # itself does not count


def test_the_latest_approval_wins_and_a_revoked_one_does_not_count(tmp_path: Path) -> None:
    store = _store(tmp_path)
    v1, v2, v3 = (store.submit(src, "P", "researcher") for src in (V1, V2, V3))
    assert store.last_approved_version(v3) is None
    store.approve(v2["sha256"], by="cli:bob")
    store.approve(v1["sha256"], by="cli:carol")  # approved after v2: the most recent approval
    assert store.last_approved_version(v3)["sha256"] == v1["sha256"]
    store.revoke(v1["sha256"], by="cli:carol", note="leaks")
    assert store.last_approved_version(v3)["sha256"] == v2["sha256"]


def test_versions_first_seen_in_the_same_millisecond_keep_the_order_they_were_stored_in(tmp_path, monkeypatch) -> None:
    """A researcher's client may send two versions within a millisecond: each was the other's previous version."""
    import fedsilo.node.plans as plans

    store = _store(tmp_path)
    monkeypatch.setattr(plans, "now_iso", lambda: "2026-12-01T07:40:00.000+00:00")
    v1, v2, v3 = (store.submit(src, "P", "researcher") for src in (V1, V2, V3))
    assert v1["first_seen"] == v2["first_seen"] == v3["first_seen"]
    assert store.previous_version(v1) is None
    assert store.previous_version(v2)["sha256"] == v1["sha256"]
    assert store.previous_version(v3)["sha256"] == v2["sha256"]
