"""Who may use a node and its datasets (`node/access.py`) and `fedsilo node dataset allow|deny|open|access`."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from fedsilo.node.access import DatasetAccess, node_permits
from fedsilo.node.audit import AuditLog
from fedsilo.node.cli import node
from fedsilo.node.config import NodeConfig
from fedsilo.node.datasets import DatasetStore
from tests.support.creds import offline_credentials


def test_the_node_list_unset_means_the_roster_and_empty_means_no_one() -> None:
    assert node_permits(None, "r1")
    assert not node_permits([], "r1")
    assert node_permits(["r1"], "r1") and not node_permits(["r1"], "r2")


def test_allow_then_deny_then_open(tmp_path: Path) -> None:
    access = DatasetAccess(tmp_path)
    assert access.permits("ds1", "r1") and access.rule("ds1") is None
    access.allow("ds1", ["r1"], by="test")
    assert access.permits("ds1", "r1") and not access.permits("ds1", "r2")
    assert access.permits("ds2", "r2"), "a rule on one dataset changed another"
    access.deny("ds1", ["r1"], by="test")
    assert not access.permits("ds1", "r1")
    access.allow("ds1", ["r1"], by="test")  # allowing again lifts the deny
    assert access.permits("ds1", "r1")
    access.deny("ds3", ["r2"], by="test")  # a deny on an open dataset keeps it open to everyone else
    assert not access.permits("ds3", "r2") and access.permits("ds3", "r1")
    access.open("ds1", by="test")
    assert access.permits("ds1", "r2")
    changes = [e["details"]["change"] for e in AuditLog(tmp_path).list(event="dataset_access_changed")]
    assert changes == ["allow", "deny", "allow", "deny", "open"]
    with pytest.raises(ValueError, match="at least one"):
        access.allow("ds1", [" "], by="test")


def test_the_cli_names_the_dataset_and_shows_the_rules(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "t.csv").write_text("a,b,label\n" + "".join(f"{i},{i + 1},{i % 2}\n" for i in range(12)))
    runner, nodedir = CliRunner(), tmp_path / "node"
    creds = offline_credentials(tmp_path / "n1.json", "n1")
    r = runner.invoke(node, ["init", "--dir", str(nodedir), "--name", "n1", "--network", str(creds)])
    assert r.exit_code == 0, r.output
    ds = DatasetStore(nodedir).add("heart", ["t"], "csv", data / "t.csv", added_by="test")
    r = runner.invoke(node, ["dataset", "allow", "--dir", str(nodedir), "heart", "r1", "r2"])
    assert r.exit_code == 0 and "allowed: r1, r2" in r.output, r.output
    assert DatasetAccess(nodedir).rule(ds["dataset_id"])["allow"] == ["r1", "r2"]
    r = runner.invoke(node, ["dataset", "deny", "--dir", str(nodedir), ds["dataset_id"], "r2"])
    assert "allowed: r1; denied: r2" in r.output, r.output
    cfg = NodeConfig.load(nodedir)
    cfg.node.researchers = []
    cfg.save()
    r = runner.invoke(node, ["dataset", "access", "--dir", str(nodedir)])
    assert "node takes: no researcher" in r.output and "denied: r2" in r.output, r.output
    r = runner.invoke(node, ["dataset", "allow", "--dir", str(nodedir), "nope", "r1"])
    assert r.exit_code == 1 and "nope" in r.output
