"""The dataset registry (`NODEDIR/db/datasets.json`): what the node offers, validated when added.

Every change is also written to the AuditLog with the acting person (`added_by` / `by`), so callers
(CLI, GUI) do not record dataset events themselves.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from tinydb import Query

from fedsilo.common.dataformats import (
    DatasetFormatError,
    list_image_folder,
    load_image_array,
    missing_counts,
    read_csv,
)
from fedsilo.common.errors import FedsiloError
from fedsilo.network.messages import DatasetInfo

from ._db import LockedDB, now_iso
from .audit import AuditLog
from .config import NodeConfig, node_paths

SCHEMA_VERSION = 1
DATA_TYPES = ("csv", "images")
MISSING_POLICIES = ("refuse", "keep")


class DatasetError(FedsiloError):
    """A dataset cannot be registered or used as asked; the message says why."""


class UnknownDataset(DatasetError, KeyError):
    """No dataset with this id or name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown dataset"


class DatasetStore:
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
    def info(record: dict[str, Any]) -> DatasetInfo:
        """What researchers may see: everything but the path."""
        return DatasetInfo(
            dataset_id=record["dataset_id"],
            name=record["name"],
            tags=record["tags"],
            data_type=record["data_type"],
            shape=record.get("shape", []),
            description=record.get("description", ""),
            summary=record.get("summary", {}),
        )

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
        missing: str = "refuse",
    ) -> dict[str, Any]:
        """Validate and register a dataset. `missing`: what to do with a CSV's missing or non-finite cells,
        "refuse" (the error names the columns and counts) or "keep" (counted in the summary, with a warning
        that researchers see)."""
        name = (name or "").strip()
        if not name:
            raise DatasetError("dataset name must not be empty")
        tags = _clean_tags(tags)
        if data_type not in DATA_TYPES:
            raise DatasetError(f"unknown data type '{data_type}'; use one of: {', '.join(DATA_TYPES)}")
        resolved = self.check_path(path)
        if missing not in MISSING_POLICIES:
            raise DatasetError(f"unknown missing-value policy '{missing}'; use one of: {', '.join(MISSING_POLICIES)}")
        shape, summary, fingerprint = _inspect(resolved, data_type, target, self.data_roots, missing)
        record = {
            "dataset_id": "ds_" + uuid.uuid4().hex[:16],
            "name": name,
            "tags": tags,
            "data_type": data_type,
            "path": str(resolved),
            "description": description,
            "shape": shape,
            "summary": summary,
            "target": target,
            "added_by": added_by,
            "added_at": now_iso(),
            "fingerprint": fingerprint,
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


def _inspect(
    path: Path, data_type: str, target: str | None, roots: list[Path], policy: str
) -> tuple[list[int], dict[str, Any], str]:
    """Check content against the declared type: (shape, summary, fingerprint); `policy` for missing CSV cells."""
    if data_type == "csv":
        if not path.is_file():
            raise DatasetError(f"'{path}' is a directory but data type 'csv' needs one CSV file")
        try:
            columns, data = read_csv(path)
        except DatasetFormatError as exc:
            raise DatasetError(f"not a numeric CSV with a header row: {exc}") from None
        if target is not None and target not in columns:
            raise DatasetError(f"target column '{target}' is not in the CSV; columns: {', '.join(columns)}")
        missing = missing_counts(columns, data)
        if missing and policy == "refuse":
            raise DatasetError(
                f"'{path}' has {_missing_text(missing)}; fix the file, or register it with `--missing keep` "
                "if the training plan handles missing values"
            )
        summary = {"rows": int(data.shape[0]), "columns": _column_summary(columns, data), "target": target}
        if missing:
            summary["missing"] = missing
            summary["warnings"] = [f"kept {_missing_text(missing)}: training fails on them unless the plan fills them"]
        return [int(data.shape[0]), int(data.shape[1])], summary, _file_hash(path)
    if not path.is_dir():
        raise DatasetError(f"'{path}' is a file but data type 'images' needs a folder with one subfolder per class")
    try:
        classes, samples = list_image_folder(path)
    except DatasetFormatError as exc:
        raise DatasetError(str(exc)) from None
    h = hashlib.sha256()
    for f, _ in samples:
        real = f.resolve()
        if roots and not any(real.is_relative_to(r) for r in roots):
            raise DatasetError(f"'{f}' links to {real}, outside the node's data roots")
        st = f.stat()
        h.update(f"{f.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    counts = {c: 0 for c in classes}
    for _, i in samples:
        counts[classes[i]] += 1
    try:
        first = list(load_image_array(samples[0][0]).shape)
    except Exception as exc:  # pillow raises many types for unreadable files
        raise DatasetError(f"'{samples[0][0]}' is not a readable image: {exc}") from None
    summary = {"classes": counts, "image_shape": first, "images": len(samples)}
    return [len(samples), *first], summary, h.hexdigest()


def _column_summary(columns: list[str], data: Any) -> dict[str, dict[str, Any]]:
    """dtype, min, max and mean of each column over its finite values (None when it has none)."""
    out = {}
    for i, c in enumerate(columns):
        col = data[:, i]
        col = col[np.isfinite(col)]
        stats = (float(col.min()), float(col.max()), float(col.mean())) if col.size else (None, None, None)
        out[c] = {
            "dtype": "int64" if bool((col == col.round()).all()) else "float64",
            **dict(zip(("min", "max", "mean"), stats, strict=True)),
        }
    return out


def _missing_text(missing: dict[str, int]) -> str:
    """'3 missing or non-finite values: age (2), bmi (1)'."""
    per_column = ", ".join(f"{c} ({n})" for c, n in missing.items())
    return f"{sum(missing.values())} missing or non-finite values: {per_column}"


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _find_row(table: Any, id_or_name: str) -> Any:
    """The TinyDB row of a dataset by id or name, or UnknownDataset."""
    q = Query()
    row = table.get(q.dataset_id == id_or_name) or table.get(q.name == id_or_name)
    if row is None:
        raise UnknownDataset(
            f"no dataset '{id_or_name}' on this node; `fedsilo node dataset list` shows the registered ones"
        )
    return row
