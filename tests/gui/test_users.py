"""GUI accounts: hashing, roles, the last admin, throttling, and the `fedsilo gui user` commands."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedsilo.gui.cli import gui
from fedsilo.gui.users import LOCKOUT_S, MAX_FAILURES, UserError, UserStore

PW = "correct-horse-1"


def test_password_is_hashed_and_file_private(tmp_path: Path) -> None:
    store = UserStore(tmp_path)
    record = store.add("alice", PW, "data_manager")
    assert "password_hash" not in record
    text = (tmp_path / "db" / "users.json").read_text()
    assert PW not in text
    assert "scrypt:" in text or "pbkdf2:" in text
    assert stat.S_IMODE((tmp_path / "db" / "users.json").stat().st_mode) == 0o600
    assert store.authenticate("alice", PW, "10.0.0.1").ok
    assert not store.authenticate("alice", PW + "x", "10.0.0.1").ok


@pytest.mark.parametrize(
    ("username", "password", "role", "message"),
    [
        ("bad name", PW, "viewer", "invalid username"),
        ("bob", "short", "viewer", "too short"),
        ("bob", PW, "superuser", "unknown role"),
    ],
)
def test_invalid_accounts_refused(tmp_path: Path, username: str, password: str, role: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        UserStore(tmp_path).add(username, password, role)


def test_duplicate_and_last_admin(tmp_path: Path) -> None:
    store = UserStore(tmp_path)
    store.add("root", PW, "admin")
    with pytest.raises(UserError, match="already exists"):
        store.add("root", PW, "viewer")
    with pytest.raises(UserError, match="last admin"):
        store.remove("root")
    with pytest.raises(UserError, match="last admin"):
        store.set_role("root", "viewer")
    store.add("root2", PW, "admin")
    store.set_role("root", "viewer")
    assert [(u["username"], u["role"]) for u in store.list()] == [("root", "viewer"), ("root2", "admin")]


def test_throttle_per_user_and_address(tmp_path: Path) -> None:
    store = UserStore(tmp_path)
    store.add("alice", PW, "data_manager")
    now = 1_000_000.0
    for i in range(MAX_FAILURES):
        result = store.authenticate("alice", "wrong-password", "10.0.0.1", now=now + i)
    assert result.locked_for > 0
    assert not store.authenticate("alice", PW, "10.0.0.1", now=now + 10).ok  # right password, still locked
    assert store.authenticate("alice", PW, "10.0.0.2", now=now + 10).ok  # another address is not blocked
    assert store.authenticate("alice", PW, "10.0.0.1", now=now + LOCKOUT_S + 10).ok


def test_password_reset_ends_sessions(tmp_path: Path) -> None:
    store = UserStore(tmp_path)
    before = store.add("alice", PW, "viewer")["session_token"]
    store.set_password("alice", "another-password-2")
    assert store.get("alice")["session_token"] != before
    assert store.authenticate("alice", "another-password-2", "x").ok


def test_cli_user_commands(tmp_path: Path) -> None:
    runner = CliRunner()
    nodedir = tmp_path / "node"
    result = runner.invoke(gui, ["user", "add", "--dir", str(nodedir), "alice", "--password-stdin"], input=PW + "\n")
    assert result.exit_code == 1
    assert "not a node directory" in result.output
    nodedir.mkdir()
    (nodedir / "config.toml").write_text('[node]\nname = "n"\nnode_id = "n"\n')
    args = ["--dir", str(nodedir)]
    result = runner.invoke(gui, ["user", "add", *args, "alice", "--role", "viewer", "--password-stdin"], input=PW)
    assert result.exit_code == 0, result.output
    assert runner.invoke(gui, ["user", "set-role", *args, "alice", "data_manager"]).exit_code == 0
    listed = runner.invoke(gui, ["user", "list", *args]).output
    assert "alice" in listed and "data_manager" in listed
    result = runner.invoke(gui, ["user", "add", *args, "alice", "--password-stdin"], input=PW)
    assert result.exit_code == 1 and "already exists" in result.output
    assert runner.invoke(gui, ["user", "remove", *args, "alice"]).exit_code == 0
    assert UserStore(nodedir).list() == []
