"""GUI accounts: NODEDIR/db/users.json (TinyDB under a file lock), hashed passwords, roles, login throttling."""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from filelock import FileLock
from tinydb import Query, TinyDB
from werkzeug.security import check_password_hash, generate_password_hash

from fedsilo.common.errors import FedsiloError

SCHEMA_VERSION = 1
ROLES = ("admin", "data_manager", "viewer")
WRITER_ROLES = frozenset({"admin", "data_manager"})
MIN_PASSWORD_LENGTH = 10
USERNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")

MAX_FAILURES = 5
FAILURE_WINDOW_S = 15 * 60
LOCKOUT_S = 15 * 60

# Checked against when the username is unknown, so that a wrong name costs as long as a wrong password
# and response times do not reveal which accounts exist.
_DUMMY_HASH = generate_password_hash("fedsilo-no-such-user")


class UserError(FedsiloError):
    """An account operation was refused; the message says why."""


@dataclass(frozen=True)
class AuthResult:
    """Outcome of a login attempt: `user` is set on success, `locked_for` > 0 while throttled."""

    user: dict[str, Any] | None
    locked_for: int = 0

    @property
    def ok(self) -> bool:
        return self.user is not None


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _public(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "password_hash"}


class UserStore:
    """Accounts of one node's GUI; every read and write holds the file lock (several gunicorn workers)."""

    def __init__(self, nodedir: str | Path) -> None:
        self.path = Path(nodedir) / "db" / "users.json"
        self._lock = FileLock(str(self.path) + ".lock", timeout=10)

    @contextmanager
    def _db(self) -> Iterator[TinyDB]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            new = not self.path.exists()
            if new:
                # Created 0600 up front: the file holds password hashes.
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            db = TinyDB(self.path, indent=1)
            try:
                meta = db.table("_meta")
                if new or not meta.all():
                    meta.truncate()
                    meta.insert({"schema_version": SCHEMA_VERSION})
                else:
                    version = meta.all()[0].get("schema_version")
                    if version != SCHEMA_VERSION:
                        raise UserError(f"{self.path}: schema version {version}, this fedsilo reads {SCHEMA_VERSION}")
                yield db
            finally:
                db.close()

    # accounts

    def add(self, username: str, password: str, role: str) -> dict[str, Any]:
        _check_username(username)
        _check_role(role)
        _check_password(password)
        with self._db() as db:
            users = db.table("users")
            if users.get(Query().username == username) is not None:
                raise UserError(f"user '{username}' already exists")
            record = {
                "username": username,
                "password_hash": generate_password_hash(password),
                "role": role,
                "created_at": _now_iso(),
                "last_login": None,
                "session_token": secrets.token_urlsafe(16),
            }
            users.insert(record)
        return _public(record)

    def list(self) -> list[dict[str, Any]]:
        with self._db() as db:
            rows = [_public(dict(r)) for r in db.table("users").all()]
        return sorted(rows, key=lambda r: r["username"])

    def get(self, username: str) -> dict[str, Any] | None:
        """The account without its password hash, or None."""
        with self._db() as db:
            record = db.table("users").get(Query().username == username)
        return _public(dict(record)) if record is not None else None

    def remove(self, username: str) -> None:
        with self._db() as db:
            users = db.table("users")
            record = users.get(Query().username == username)
            if record is None:
                raise UserError(f"no user '{username}'")
            if record["role"] == "admin" and self._admin_count(db) == 1:
                raise UserError(f"'{username}' is the last admin; add another admin first")
            users.remove(Query().username == username)

    def set_role(self, username: str, role: str) -> dict[str, Any]:
        _check_role(role)
        with self._db() as db:
            users = db.table("users")
            record = users.get(Query().username == username)
            if record is None:
                raise UserError(f"no user '{username}'")
            if record["role"] == "admin" and role != "admin" and self._admin_count(db) == 1:
                raise UserError(f"'{username}' is the last admin; add another admin first")
            users.update({"role": role}, Query().username == username)
            record = dict(record, role=role)
        return _public(record)

    def set_password(self, username: str, password: str) -> None:
        """Change a password; existing sessions of that user end."""
        _check_password(password)
        with self._db() as db:
            users = db.table("users")
            if users.get(Query().username == username) is None:
                raise UserError(f"no user '{username}'")
            users.update(
                {"password_hash": generate_password_hash(password), "session_token": secrets.token_urlsafe(16)},
                Query().username == username,
            )

    def end_sessions(self, username: str) -> None:
        """Invalidate every session cookie issued to this user (logout)."""
        with self._db() as db:
            db.table("users").update({"session_token": secrets.token_urlsafe(16)}, Query().username == username)

    @staticmethod
    def _admin_count(db: TinyDB) -> int:
        return len(db.table("users").search(Query().role == "admin"))

    # login

    def authenticate(self, username: str, password: str, client: str, now: float | None = None) -> AuthResult:
        """Check a password, throttled per (username, client address)."""
        now = time.time() if now is None else now
        key = f"{username}|{client}"
        with self._db() as db:
            throttle = db.table("throttle")
            entry = throttle.get(Query().key == key)
            if entry is not None and entry.get("locked_until", 0) > now:
                return AuthResult(None, locked_for=int(entry["locked_until"] - now) + 1)
            users = db.table("users")
            record = users.get(Query().username == username)
            if record is None:
                check_password_hash(_DUMMY_HASH, password)
                ok = False
            else:
                ok = check_password_hash(record["password_hash"], password)
            if ok:
                throttle.remove(Query().key == key)
                users.update({"last_login": _now_iso()}, Query().username == username)
                return AuthResult(_public(dict(record)))
            failures = 1
            first = now
            if entry is not None and now - entry.get("first_failure", 0) < FAILURE_WINDOW_S:
                failures = entry["failures"] + 1
                first = entry["first_failure"]
            locked_until = now + LOCKOUT_S if failures >= MAX_FAILURES else 0
            # Drop stale entries so that failures with made-up usernames do not pile up in the file.
            throttle.remove(
                (Query().locked_until < now) & (Query().first_failure < now - FAILURE_WINDOW_S) & (Query().key != key)
            )
            throttle.upsert(
                {"key": key, "failures": failures, "first_failure": first, "locked_until": locked_until},
                Query().key == key,
            )
            return AuthResult(None, locked_for=int(LOCKOUT_S) if locked_until else 0)


def _check_username(username: str) -> None:
    if not USERNAME_RE.match(username):
        raise UserError(
            f"invalid username '{username}': 1 to 64 letters, digits, '.', '_', '@' or '-', starting with a "
            "letter or digit"
        )


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise UserError(f"unknown role '{role}'; choose one of {', '.join(ROLES)}")


def _check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"password too short: at least {MIN_PASSWORD_LENGTH} characters")
