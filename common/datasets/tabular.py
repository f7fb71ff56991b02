"""The `csv` dataset type: one clinical table (numeric, categorical and date columns), any usual delimiter.

    fedsilo node dataset add --type csv --path adni.csv --target DX --missing drop-rows   # ';' sniffed

Registration reads the whole table once and stores per column its type and counts (numeric columns
also their minimum, maximum and mean, for the node's own eyes); `describe` gives researchers types and
counts only. Plans load it with `CsvDataset` or `fedsilo.common.datasets.load(record)`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .describe import count_text, describe_categories, describe_samples, missing_text, suppressed_counts
from .registry import DatasetFormatError, DatasetType, FormField, Validated, register
from .table_arrays import MISSING_POLICIES
from .tables import Table, read_table

MAX_DESCRIBED_COLUMNS = 100
"""Columns described to researchers (the first ones; the shape still counts all; `columns_not_described` says
how many are left out). A search reply is one message of at most 256 KiB holding every matching dataset:
measured, 250 categorical columns of 40 frequent labels (2,000 rows) describe in 109 KB with 200 columns,
54 KB with 100 (20 labels each, `describe.MAX_CATEGORIES`); a 6-column clinical table in 0.7 KB."""
TOP_LABELS = 50
"""Labels of a categorical column whose counts are stored (the most frequent); the rest are summed: an
identifier column of 10,000 patients would otherwise store 10,000 entries."""


class CsvType(DatasetType):
    """A CSV table with a header row; see the module doc."""

    name = "csv"
    label = "Table (CSV)"
    path_kind = "file"
    path_help = "one CSV file with a header row"
    path_suffixes = (".csv", ".tsv", ".txt")
    pick_text = "Use this CSV file"
    form_fields = (
        FormField("target", "Target column", "text", help="the column a plan predicts (checked to exist)"),
        FormField("delimiter", "Delimiter", "text", help=", ; | : tab or space; empty: detected"),
        FormField("missing", "Missing values", "choice", choices=MISSING_POLICIES, default="refuse",
                  help="cells that are empty, NA, NaN or infinite: refuse the file (the error counts them per "
                  "column), keep them with a warning researchers see (the plan must handle them), or drop "
                  "the rows holding one (counted)"),
    )  # fmt: skip

    def validate(self, path: Path, options: Mapping[str, Any], roots: Sequence[Path] = ()) -> Validated:
        if not path.is_file():
            raise DatasetFormatError(f"'{path}' is a directory but data type 'csv' needs one CSV file")
        target = options.get("target") or None
        policy = options.get("missing") or "refuse"
        if policy not in MISSING_POLICIES:
            raise DatasetFormatError(
                f"unknown missing-value policy '{policy}'; use one of: {', '.join(MISSING_POLICIES)}"
            )
        try:
            table = read_table(path, options.get("delimiter") or None)
        except DatasetFormatError as exc:
            raise DatasetFormatError(f"not a CSV table with a header row: {exc}") from None
        if target is not None and target not in table.columns:
            raise DatasetFormatError(f"target column '{target}' is not in the CSV; columns: {', '.join(table.columns)}")
        missing = table.missing()
        rows = int(table.data.shape[0])
        summary: dict[str, Any] = {"rows": rows, "columns": _columns(table), "target": target,
                                   "delimiter": table.delimiter}  # fmt: skip
        warnings: list[str] = []
        if missing and policy == "refuse":
            raise DatasetFormatError(
                f"'{path}' has {missing_text(missing)}; fix the file, or register it with `--missing keep` "
                "if the training plan handles missing values (or `--missing drop-rows`)"
            )
        if missing:
            summary["missing"] = missing
        if missing and policy == "keep":
            warnings.append(f"kept {missing_text(missing)}: training fails on them unless the plan fills them")
        if missing and policy == "drop-rows":
            rows = int(np.count_nonzero(table.complete_rows()))
            if not rows:
                raise DatasetFormatError(f"'{path}': every row holds a missing value; nothing left to train on")
            summary["rows_dropped"] = summary["rows"] - rows
            summary["rows"] = rows
        options = {"target": target, "delimiter": table.delimiter, "missing": policy}
        return Validated([rows, len(table.columns)], summary, file_sha256(path), options, warnings)

    def describe(self, record: Mapping[str, Any], min_count: int) -> dict[str, Any]:
        summary = record.get("summary") or {}
        shape, samples = describe_samples(record.get("shape") or [], min_count)
        rows_read = int(summary.get("rows", 0)) + int(summary.get("rows_dropped", 0))
        missing = summary.get("missing") or {}
        stored = list((summary.get("columns") or {}).items())
        columns = {
            name: _describe_column(col, rows_read - int(missing.get(name, 0)), min_count)
            for name, col in stored[:MAX_DESCRIBED_COLUMNS]
        }
        out: dict[str, Any] = {"samples": samples, "shape": shape, "columns": columns, "target": summary.get("target")}
        if len(stored) > MAX_DESCRIBED_COLUMNS:
            out["columns_not_described"] = len(stored) - MAX_DESCRIBED_COLUMNS
        if missing:
            out["missing"] = suppressed_counts(missing, min_count)
            if (record.get("options") or {}).get("missing", "keep") == "keep":
                out["warnings"] = [f"kept {missing_text(out['missing'])}: training fails on them unless the plan "
                                   "fills them"]  # fmt: skip
        if summary.get("rows_dropped"):
            out["rows_dropped"] = count_text(summary["rows_dropped"], min_count)
        return out

    def loader(self, record: Mapping[str, Any], loading_plan: Any | None = None) -> Any:
        from .torch_datasets import CsvDataset

        if isinstance(loading_plan, Mapping):
            from .loading_plan import DataLoadingPlan

            loading_plan = DataLoadingPlan.parse(loading_plan)
        options = record.get("options") or {}
        target = options.get("target") or record.get("target") or "label"  # the file's name for it
        renames = getattr(loading_plan, "renames", None) or {}
        return CsvDataset(record["path"], target=renames.get(target, target), delimiter=options.get("delimiter"),
                          encode=True, missing=options.get("missing", "keep"), loading_plan=loading_plan)  # fmt: skip


def _columns(table: Table) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for j, name in enumerate(table.columns):
        kind = table.kinds[name]
        col = table.data[:, j]
        present = col[np.isfinite(col)]
        if kind == "numeric":
            stats = (float(present.min()), float(present.max()), float(present.mean())) if present.size else (None,) * 3
            integral = bool((present == present.round()).all())
            out[name] = {"type": "numeric", "dtype": "int64" if integral else "float64",
                         **dict(zip(("min", "max", "mean"), stats, strict=True))}  # fmt: skip
        elif kind == "date":
            out[name] = {"type": "date", "format": table.date_formats[name]}
        else:
            counts = table.label_counts[name]
            top = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_LABELS])
            out[name] = {"type": "categorical", "distinct": len(counts), "labels": top,
                         "rest": sum(counts.values()) - sum(top.values())}  # fmt: skip
    return out


def _describe_column(col: Mapping[str, Any], present: int, min_count: int) -> dict[str, Any]:
    """A column for researchers: its type and counts; no minimum, maximum, mean or rare label."""
    kind = col.get("type", "numeric")  # records added before typed columns hold numeric ones only
    if kind == "categorical":
        labels = dict(col.get("labels") or {})
        out = describe_categories(labels, min_count)
        out["distinct"] = int(col.get("distinct", len(labels)))
        rest = int(col.get("rest", 0))
        if rest:
            rare = sum(int(n) for n in labels.values() if n < min_count) + rest
            out["other"] = count_text(rare, min_count)
        out["count"] = count_text(present, min_count)
        return out
    out = {"type": kind, "count": count_text(present, min_count)}
    if kind == "numeric":
        out["dtype"] = col.get("dtype", "float64")
    return out


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


register(CsvType())
