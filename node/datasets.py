"""The dataset registry (`NODEDIR/db/datasets.json`): what the node offers, validated when added.

Every change is also written to the AuditLog with the acting person (`added_by` / `by`), so callers
(CLI, GUI) do not record dataset events themselves.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tinydb import Query

from fedsilo.common.datasets import registry
from fedsilo.common.datasets.registry import DatasetFormatError, DatasetType, UnknownDatasetType
from fedsilo.common.errors import FedsiloError
from fedsilo.network.messages import DatasetInfo

from ._db import LockedDB, now_iso
from .audit import AuditLog
from .config import NodeConfig, node_paths

SCHEMA_VERSION = 1
DEFAULT_MIN_COUNT = 5
"""`[node] min_count` when a store is used without a node configuration (tests, tools)."""


class DatasetError(FedsiloError):
    """A dataset cannot be registered or used as asked; the message says why."""


class DatasetTooSmall(DatasetError):
    """The dataset holds fewer samples than the node's `min_count`: refused for training and evaluation."""


class UnknownDataset(DatasetError, KeyError):
    """No dataset with this id or name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown dataset"


class DatasetStore:
    """The node's datasets, each validated by its registered `DatasetType` when added.

    store = DatasetStore(nodedir)
    rec = store.add("adni", ["adni"], "csv", "/data/adni.csv", options={"target": "DX", "missing": "keep"})
    store.describe(rec)        # what researchers and the GUI see (counts below min_count as "< N")
    """

    TABLE = "datasets"

    def __init__(self, nodedir: str | Path, data_roots: list[str] | None = None) -> None:
        self.nodedir = node_paths(nodedir).root
        self._db = LockedDB(node_paths(nodedir).datasets, "datasets", SCHEMA_VERSION)
        self._roots = data_roots
        self.audit = AuditLog(nodedir)

    def ensure(self) -> None:
        self._db.ensure()

    @property
    def data_roots(self) -> list[Path]:
        roots = self._roots
        if roots is None:
            cfg_file = node_paths(self.nodedir).config
            roots = NodeConfig.load(self.nodedir).node.data_roots if cfg_file.is_file() else []
        return [Path(r).expanduser().resolve() for r in roots]

    @property
    def min_count(self) -> int:
        """`[node] min_count` of the node's configuration (read each time: the data manager may change it)."""
        if node_paths(self.nodedir).config.is_file():
            return NodeConfig.load(self.nodedir).node.min_count
        return DEFAULT_MIN_COUNT

    # ------------------------------------------------------------------ reads
    def list(self) -> list[dict[str, Any]]:
        with self._db.read() as db:
            rows = [dict(r) for r in db.table(self.TABLE).all()]
        return sorted(rows, key=lambda r: r["added_at"])

    def get(self, id_or_name: str) -> dict[str, Any]:
        with self._db.read() as db:
            return dict(_find_row(db.table(self.TABLE), id_or_name))

    def search(self, tags: list[str]) -> list[dict[str, Any]]:
        """Datasets carrying every one of `tags`."""
        wanted = set(tags)
        return [r for r in self.list() if wanted <= set(r["tags"])]

    @staticmethod
    def info(record: Mapping[str, Any], min_count: int = DEFAULT_MIN_COUNT) -> DatasetInfo:
        """What researchers may see: the name, tags and type, and the type's privacy-safe description
        (`summary`); never the path, a value of one patient, or a count below `min_count` (the shape is
        left out for a dataset smaller than that)."""
        summary = describe(record, min_count)
        return DatasetInfo(
            dataset_id=record["dataset_id"],
            name=record["name"],
            tags=record["tags"],
            data_type=record["data_type"],
            shape=summary.pop("shape", []),
            description=record.get("description", ""),
            summary=summary,
        )

    def describe(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """The record's privacy-safe description under this node's `min_count` (shape included)."""
        return describe(record, self.min_count)

    # ------------------------------------------------------------------ writes
    def add(
        self,
        name: str,
        tags: list[str],
        data_type: str,
        path: str | Path,
        description: str = "",
        added_by: str = "cli",
        target: str | None = None,
        missing: str | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Validate and register a dataset with its type's `options` (the type's `form_fields`; `target`
        and `missing` are shortcuts for the csv type's). A csv's `missing` policy: "refuse" (default; the
        error names the columns and counts), "keep" (counted, with a warning that researchers see) or
        "drop-rows"."""
        name = (name or "").strip()
        if not name:
            raise DatasetError("dataset name must not be empty")
        tags = _clean_tags(tags)
        dtype = _type(data_type)
        resolved = self.check_path(path)
        opts = self._options(dtype, {**(options or {}), **({"target": target} if target is not None else {}),
                                     **({"missing": missing} if missing is not None else {})})  # fmt: skip
        try:
            found = dtype.validate(resolved, opts, self.data_roots)
        except DatasetFormatError as exc:
            raise DatasetError(str(exc)) from None
        stored = {**{k: (str(v) if isinstance(v, Path) else v) for k, v in opts.items()}, **found.options}
        record = {
            "dataset_id": "ds_" + uuid.uuid4().hex[:16],
            "name": name,
            "tags": tags,
            "data_type": dtype.name,
            "path": str(resolved),
            "description": description,
            "shape": found.shape,
            "summary": {**found.summary, **({"warnings": found.warnings} if found.warnings else {})},
            "target": stored.get("target"),
            "options": stored,
            "added_by": added_by,
            "added_at": now_iso(),
            "fingerprint": found.fingerprint,
        }
        q = Query()
        with self._db.write() as db:
            t = db.table(self.TABLE)
            if t.contains(q.name == name):
                raise DatasetError(f"a dataset named '{name}' already exists; choose another name or remove it")
            t.insert(record)
        self.audit.record(
            "dataset_added", added_by, dataset_id=record["dataset_id"], name=name, tags=tags, path=record["path"]
        )
        return record

    def _options(self, dtype: DatasetType, given: Mapping[str, Any]) -> dict[str, Any]:
        """The type's options checked against its form fields: unknown, missing required and bad choices
        refused; path and file options resolved and confined to the data roots like the dataset's path."""
        known = {f.name: f for f in dtype.form_fields}
        unknown = sorted(k for k, v in given.items() if k not in known and v not in (None, ""))
        if unknown:
            raise DatasetError(f"data type '{dtype.name}' takes no option {', '.join(unknown)}"
                               f"{'; it takes: ' + ', '.join(known) if known else ''}")  # fmt: skip
        out: dict[str, Any] = {}
        for f in dtype.form_fields:
            value = given.get(f.name)
            value = f.default if value is None or (isinstance(value, str) and not value.strip()) else value
            if value is None:
                if f.required:
                    raise DatasetError(f"data type '{dtype.name}' needs {f.option} ({f.label.lower()})")
                continue
            if f.kind == "choice" and value not in f.choices:
                raise DatasetError(f"{f.option} '{value}' is not one of: {', '.join(f.choices)}")
            if f.kind in ("path", "file"):
                value = self.check_path(value)
                if f.kind == "file" and not value.is_file():
                    raise DatasetError(f"{f.option} '{value}' is not a file")
            out[f.name] = value.strip() if isinstance(value, str) else value
        return out

    def update(
        self,
        dataset_id: str,
        tags: list[str] | None = None,
        description: str | None = None,
        by: str = "cli",
    ) -> dict[str, Any]:
        changes: dict[str, Any] = {}
        if tags is not None:
            changes["tags"] = _clean_tags(tags)
        if description is not None:
            changes["description"] = description
        with self._db.write() as db:
            t = db.table(self.TABLE)
            row = _find_row(t, dataset_id)
            if changes:
                t.update(changes, doc_ids=[row.doc_id])
            record = {**row, **changes}
        self.audit.record("dataset_updated", by, dataset_id=record["dataset_id"], **changes)
        return record

    def remove(self, dataset_id: str, by: str = "cli") -> dict[str, Any]:
        """Forget a dataset (its files are left untouched)."""
        with self._db.write() as db:
            t = db.table(self.TABLE)
            row = _find_row(t, dataset_id)
            t.remove(doc_ids=[row.doc_id])
        self.audit.record("dataset_removed", by, dataset_id=row["dataset_id"], name=row["name"])
        return dict(row)

    # ------------------------------------------------------------------ path policy
    def check_path(self, path: str | Path) -> Path:
        """Resolve a dataset path (symlinks included) and refuse it outside the node's data roots."""
        raw = Path(path).expanduser()
        if not raw.is_absolute():
            raw = Path.cwd() / raw
        try:
            resolved = raw.resolve(strict=True)
        except FileNotFoundError:
            raise DatasetError(f"path '{path}' does not exist") from None
        except (OSError, RuntimeError) as exc:
            raise DatasetError(f"path '{path}' cannot be resolved: {exc}") from None
        if not os.access(resolved, os.R_OK) or (resolved.is_dir() and not os.access(resolved, os.X_OK)):
            raise DatasetError(f"path '{path}' is not readable by this node")
        roots = self.data_roots
        if roots and not any(resolved.is_relative_to(r) for r in roots):
            shown = f" (resolves to {resolved})" if str(resolved) != str(raw) else ""
            raise DatasetError(
                f"path '{path}'{shown} is outside the node's data roots "
                f"({', '.join(str(r) for r in roots)}); move the data or add a data root in config.toml"
            )
        return resolved


def _clean_tags(tags: list[str] | tuple[str, ...] | None) -> list[str]:
    out: list[str] = []
    for t in tags or []:
        t = str(t).strip()
        if not t:
            continue
        if "," in t:
            raise DatasetError(f"tag '{t}' contains a comma; give tags as separate values")
        if t not in out:
            out.append(t)
    if not out:
        raise DatasetError("a dataset needs at least one non-empty tag (researchers find data by tags)")
    return out


def _type(name: str) -> DatasetType:
    try:
        return registry.get(name)
    except UnknownDatasetType as exc:
        raise DatasetError(str(exc)) from None


def describe(record: Mapping[str, Any], min_count: int = DEFAULT_MIN_COUNT) -> dict[str, Any]:
    """A dataset's privacy-safe description (its type's `describe`), `shape` included."""
    return _type(str(record.get("data_type", ""))).describe(record, min_count)


def check_min_count(record: Mapping[str, Any], min_count: int) -> None:
    """Refuse a dataset holding fewer samples than `min_count` (DatasetTooSmall, the count not named)."""
    if _type(str(record.get("data_type", ""))).samples(record) < min_count:
        raise DatasetTooSmall(
            f"dataset '{record.get('name')}' holds fewer than {min_count} samples, this node's minimum "
            "([node] min_count) for training and evaluation"
        )


def _find_row(table: Any, id_or_name: str) -> Any:
    """The TinyDB row of a dataset by id or name, or UnknownDataset."""
    q = Query()
    row = table.get(q.dataset_id == id_or_name) or table.get(q.name == id_or_name)
    if row is None:
        raise UnknownDataset(
            f"no dataset '{id_or_name}' on this node; `fedsilo node dataset list` shows the registered ones"
        )
    return row
