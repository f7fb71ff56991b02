"""`fedsilo node` commands against real node directories and TinyDB files."""

from __future__ import annotations

import getpass
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedsilo.node.audit import AuditLog
from fedsilo.node.cli import node
from fedsilo.node.plans import PlanStore
from tests.support.creds import offline_credentials


@pytest.fixture
def env(tmp_path: Path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "t.csv").write_text("a,b,label\n1,2,0\n3,4,1\n")
    creds = offline_credentials(tmp_path / "n1.json", "n1")
    nodedir = tmp_path / "node"
    runner = CliRunner()
    r = runner.invoke(
        node, ["init", "--dir", str(nodedir), "--name", "n1", "--network", str(creds), "--data-root", str(data)]
    )
    assert r.exit_code == 0, r.output
    return runner, nodedir, data, tmp_path


def run(runner: CliRunner, *args: str):
    return runner.invoke(node, list(args))


def test_init_layout_and_refuses_twice(env):
    runner, nodedir, _data, tmp = env
    assert (nodedir / "config.toml").is_file() and (nodedir / "network.json").is_file()
    assert (nodedir / "network.json").stat().st_mode & 0o777 == 0o600
    r = run(runner, "init", "--dir", str(nodedir), "--name", "n1", "--network", str(tmp / "n1.json"))
    assert r.exit_code == 1 and "already a node directory" in r.output
    r = run(runner, "config", "show", "--dir", str(nodedir))
    assert r.exit_code == 0 and "require_approval = true" in r.output


def test_init_refuses_researcher_credentials(tmp_path):
    creds = offline_credentials(tmp_path / "r.json", "r", role="researcher")
    r = CliRunner().invoke(node, ["init", "--dir", str(tmp_path / "n"), "--name", "n", "--network", str(creds)])
    assert r.exit_code == 1 and "not a node" in r.output


def test_dataset_add_list_show_remove(env):
    runner, nodedir, data, _ = env
    d = str(nodedir)
    r = run(runner, "dataset", "add", "--dir", d, "--name", "tab", "--tags", "csv,demo", "--type", "csv",
            "--path", str(data / "t.csv"), "--target", "label")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "shape [2, 3]" in r.output
    r = run(runner, "dataset", "list", "--dir", d)
    assert r.exit_code == 0 and "tab" in r.output and "csv,demo" in r.output
    r = run(runner, "dataset", "show", "--dir", d, "tab")
    assert r.exit_code == 0 and '"columns"' in r.output
    r = run(runner, "dataset", "remove", "--dir", d, "tab")
    assert r.exit_code == 0 and "files left in place" in r.output
    assert (data / "t.csv").exists()
    r = run(runner, "dataset", "show", "--dir", d, "tab")
    assert r.exit_code == 1 and "no dataset 'tab'" in r.output
    actor = f"cli:{getpass.getuser()}"
    events = [(e["event"], e["actor"]) for e in AuditLog(nodedir).list()]
    assert events == [("dataset_added", actor), ("dataset_removed", actor)]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "does not exist"),
        ("outside", "outside the node's data roots"),
        ("symlink", "outside the node's data roots"),
        ("dotdot", "outside the node's data roots"),
        ("duplicate", "already exists"),
        ("empty_tags", "at least one non-empty tag"),
        ("type_mismatch", "needs a folder"),
        ("not_a_table", "not a CSV table"),
    ],
)
def test_dataset_add_validation(env, case, message):
    runner, nodedir, data, tmp = env
    outside = tmp / "outside.csv"
    outside.write_text("a,label\n1,0\n")
    path, tags, dtype = str(data / "t.csv"), "t", "csv"
    if case == "missing":
        path = str(data / "nope.csv")
    elif case == "outside":
        path = str(outside)
    elif case == "symlink":
        (data / "link.csv").symlink_to(outside)
        path = str(data / "link.csv")
    elif case == "dotdot":
        path = str(data / ".." / "outside.csv")
    elif case == "duplicate":
        assert run(runner, "dataset", "add", "--dir", str(nodedir), "--name", "x", "--tags", "t", "--type", "csv",
                   "--path", path).exit_code == 0  # fmt: skip
    elif case == "empty_tags":
        tags = " , ,"
    elif case == "type_mismatch":
        dtype = "images"
    elif case == "not_a_table":  # text columns are categorical now; a row longer than the header is refused
        (data / "words.csv").write_text("a,label\nfoo,1,2\n")
        path = str(data / "words.csv")
    r = run(runner, "dataset", "add", "--dir", str(nodedir), "--name", "x", "--tags", tags, "--type", dtype,
            "--path", path)  # fmt: skip
    assert r.exit_code == 1, r.output
    assert message in r.output
    assert "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_plan_approve_reject_revoke(env):
    runner, nodedir, _, _ = env
    d = str(nodedir)
    store = PlanStore(nodedir)
    a = store.submit("class A: pass\n", "A", "alice", "a plan")
    b = store.submit("class B: pass\n", "B", "alice")
    r = run(runner, "plan", "list", "--dir", d)
    assert r.exit_code == 0 and a["sha256"][:16] in r.output and "pending" in r.output
    r = run(runner, "plan", "show", "--dir", d, a["sha256"][:10])
    assert r.exit_code == 0 and "class A: pass" in r.output and "a plan" in r.output
    r = run(runner, "plan", "approve", "--dir", d, a["sha256"][:10], "--note", "ok", "--by", "dr.who")
    assert r.exit_code == 0 and "approved" in r.output
    assert store.get(a["sha256"])["decided_by"] == "cli:dr.who"
    r = run(runner, "plan", "reject", "--dir", d, b["sha256"][:10], "--note", "no")
    assert r.exit_code == 0 and "rejected" in r.output
    r = run(runner, "plan", "revoke", "--dir", d, b["sha256"][:10])
    assert r.exit_code == 1 and "cannot revoke" in r.output
    r = run(runner, "plan", "revoke", "--dir", d, a["sha256"], "--note", "withdrawn")
    assert r.exit_code == 0 and store.status(a["sha256"]) == "rejected"
    r = run(runner, "plan", "list", "--dir", d, "--status", "rejected")
    assert r.output.count("rejected") == 2
    r = run(runner, "plan", "approve", "--dir", d, "zzzz")
    assert r.exit_code == 1 and "no plan" in r.output
    events = [(e["event"], e["actor"]) for e in AuditLog(nodedir).list() if e["event"] != "plan_submitted"]
    user = f"cli:{getpass.getuser()}"
    assert events == [("plan_approved", "cli:dr.who"), ("plan_rejected", user), ("plan_revoked", user)]


def test_commands_on_a_non_node_dir(tmp_path):
    r = CliRunner().invoke(node, ["dataset", "list", "--dir", str(tmp_path)])
    assert r.exit_code == 1 and "not a node directory" in r.output
