"""A table's feature and target arrays as a plan asks for them, with the node's loading plan applied.

No torch here: `CsvDataset` wraps the arrays, and tests check the encoding without it.

    t = read_table("adni.csv")
    x, y, used = table_arrays(t, target="DX", features=["AGE", "SEX"], encode=True, missing="drop-rows")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .registry import DatasetFormatError
from .tables import Table

MISSING_POLICIES = ("refuse", "keep", "drop-rows")
"""What to do with a row holding a missing or non-finite cell: refuse the dataset (counted per column),
keep it (NaN reaches the plan), or drop the row (counted)."""
_DLP_MISSING = {"drop": "drop-rows", "refuse": "refuse", "keep": "keep"}


def served_names(table: Table, loading_plan: Any | None) -> list[str]:
    """The table's column names as plans see them (the loading plan's renames applied)."""
    renames: Mapping[str, str] = getattr(loading_plan, "renames", None) or {}
    return [renames.get(c, c) for c in table.columns]


def table_arrays(
    table: Table,
    target: str,
    features: Sequence[str] | None = None,
    *,
    encode: bool = False,
    missing: str = "keep",
    loading_plan: Any | None = None,
    where: str = "",
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(x float64 rows x features, y float64 rows, facts: rows dropped, features used).

    Column names are the served ones (a loading plan may rename); categorical and date columns need
    `encode=True` (or categories fixed when the table was read) so that nothing is coded silently."""
    names = served_names(table, loading_plan)
    where = where or "table"
    if target not in names:
        raise DatasetFormatError(f"{where}: target column '{target}' not found; columns: {names}")
    if features is None:
        features = [c for c in names if c != target]
    absent = [c for c in features if c not in names]
    if absent:
        raise DatasetFormatError(f"{where}: feature columns not found: {absent}")
    local = {served: table.columns[i] for i, served in enumerate(names)}
    used = [*features, target]
    if not encode:
        coded = [c for c in used if table.kinds[local[c]] != "numeric" and local[c] not in table.fixed]
        if coded:
            kinds = ", ".join(f"{c} ({table.kinds[local[c]]})" for c in coded)
            raise DatasetFormatError(
                f"{where}: every value must be numeric: {kinds}; pass encode=True (dates become days since "
                "1970-01-01, labels their index in sorted order) or categories={column: [labels...]}"
            )
    x = table.data[:, [names.index(c) for c in features]]  # fancy indexing: a copy, the table stays as it is
    y = table.data[:, names.index(target)].copy()
    label_map = getattr(loading_plan, "label_map", None) or {}
    if label_map:
        y = _map_labels(y, table.labels.get(local[target]), label_map, target, where)
    policy = _DLP_MISSING.get(getattr(loading_plan, "missing", None) or "", missing)
    if policy not in MISSING_POLICIES:
        raise DatasetFormatError(f"unknown missing-value policy '{policy}'; use one of: {', '.join(MISSING_POLICIES)}")
    if policy == "keep":  # NaN reaches the plan: nothing to count
        return x, y, {"rows_dropped": 0, "features": list(features)}
    complete = np.isfinite(x).all(axis=1) & np.isfinite(y)
    dropped = int(complete.size - np.count_nonzero(complete))
    if dropped and policy == "refuse":
        raise DatasetFormatError(f"{where}: {dropped} row(s) hold a missing or non-finite value in the columns used")
    if dropped and policy == "drop-rows":
        x, y = x[complete], y[complete]
        if not y.size:
            raise DatasetFormatError(f"{where}: no complete row left once rows with missing values are dropped")
    return x, y, {"rows_dropped": dropped if policy == "drop-rows" else 0, "features": list(features)}


def _map_labels(
    y: np.ndarray, labels: list[str] | None, label_map: Mapping[str, Any], target: str, where: str
) -> np.ndarray:
    """Target values through the loading plan's label map (all at once: 1->2 and 2->1 swap). A categorical
    target maps its label text; a numeric one its value (keys as text: "2" or "2.0")."""
    out = y.copy()
    present = np.isfinite(y)
    for local, served in label_map.items():
        try:
            value = float(served)
        except (TypeError, ValueError):
            raise DatasetFormatError(f"{where}: label_map maps {local!r} to {served!r}") from None
        if labels is not None:
            if local not in labels:
                continue
            hit = present & (y == labels.index(local))
        else:
            try:
                hit = present & (y == float(local))
            except ValueError:
                continue
        out[hit] = value
    if not np.isfinite(out[present]).all():
        raise DatasetFormatError(f"{where}: label_map left a non-finite target in '{target}'")
    return out
