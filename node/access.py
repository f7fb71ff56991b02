"""Who may use a node, and each of its datasets: the node's researcher list and per-dataset rules.

Node level (`[node] researchers` in config.toml): unset = every researcher the consortium roster names
(the signature check already refused everyone else); a list = only those; `[]` = no researcher. An
empty list does not mean "all": a data manager who empties the list means to let no one in.

Dataset level (`NODEDIR/db/access.json`, set with `fedsilo node dataset allow|deny|open`): a dataset
without a rule is open to every researcher the node takes; `allow` starts (or extends) an allow-list,
after which only listed researchers may use it; `deny` names researchers refused whatever else says;
`open` removes the rule. Each change is audited (`dataset_access_changed`).

    access = DatasetAccess(nodedir)
    access.allow(dataset_id, ["r1"], by="cli:alice")
    access.permits(dataset_id, "r2")   # False: r2 is not on the allow-list
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tinydb import Query

from ._db import LockedDB, now_iso
from .audit import AuditLog

SCHEMA_VERSION = 1


def node_permits(researchers: list[str] | None, party: str) -> bool:
    """The node-level rule: None = every roster researcher, otherwise membership."""
    return researchers is None or party in researchers


class DatasetAccess:
    """Per-dataset allow- and deny-lists (see the module docstring)."""

    TABLE = "rules"

    def __init__(self, nodedir: str | Path) -> None:
        self._db = LockedDB(Path(nodedir).expanduser().absolute() / "db" / "access.json", "access", SCHEMA_VERSION)
        self._audit = AuditLog(nodedir)

    def rule(self, dataset_id: str) -> dict[str, Any] | None:
        """{dataset_id, allow: [..] | None, deny: [..], updated_by, updated_at}, or None (open)."""
        if not self._db.path.is_file():
            return None
        with self._db.read() as db:
            found = db.table(self.TABLE).get(Query().dataset_id == dataset_id)
        return dict(found) if found else None

    def rules(self) -> list[dict[str, Any]]:
        if not self._db.path.is_file():
            return []
        with self._db.read() as db:
            return [dict(r) for r in db.table(self.TABLE).all()]

    def permits(self, dataset_id: str, researcher: str) -> bool:
        rule = self.rule(dataset_id)
        if rule is None:
            return True
        if researcher in rule["deny"]:
            return False
        return rule["allow"] is None or researcher in rule["allow"]

    def allow(self, dataset_id: str, researchers: Iterable[str], by: str) -> dict[str, Any]:
        names = _names(researchers)
        return self._change(dataset_id, by, "allow", names, lambda allow, deny: (
            sorted(set(allow or ()) | set(names)), [d for d in deny if d not in names]))  # fmt: skip

    def deny(self, dataset_id: str, researchers: Iterable[str], by: str) -> dict[str, Any]:
        names = _names(researchers)
        return self._change(dataset_id, by, "deny", names, lambda allow, deny: (
            None if allow is None else [a for a in allow if a not in names],
            sorted(set(deny) | set(names))))  # fmt: skip

    def open(self, dataset_id: str, by: str) -> None:
        """Remove the dataset's rule: every researcher the node takes may use it again."""
        with self._db.write() as db:
            db.table(self.TABLE).remove(Query().dataset_id == dataset_id)
        self._audit.record("dataset_access_changed", by, dataset_id=dataset_id, change="open")

    def _change(self, dataset_id: str, by: str, change: str, names: list[str], update: Any) -> dict[str, Any]:
        with self._db.write() as db:
            table = db.table(self.TABLE)
            old = table.get(Query().dataset_id == dataset_id)
            allow, deny = update(old["allow"] if old else None, old["deny"] if old else [])
            rule = {"dataset_id": dataset_id, "allow": allow, "deny": deny, "updated_by": by, "updated_at": now_iso()}
            table.upsert(rule, Query().dataset_id == dataset_id)
        self._audit.record("dataset_access_changed", by, dataset_id=dataset_id, change=change, researchers=names,
                           allow=allow, deny=deny)  # fmt: skip
        return rule


def _names(researchers: Iterable[str]) -> list[str]:
    names = sorted({r.strip() for r in researchers if r.strip()})
    if not names:
        raise ValueError("name at least one researcher")
    return names
