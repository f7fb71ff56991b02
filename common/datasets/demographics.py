"""A medical folder's demographics table: one row per subject, keyed by the subject's folder name.

    table = read_demographics(path, index_col="participant_id")
    table.rows["sub-001"]        # {"age": 61.0, "sex": "M", "scan_date": 18262.0}
    table.columns                # {"age": "numeric", "sex": "categorical", "scan_date": "date"}

The table is read by the clinical-table reader (`tables.read_table`: delimiter sniffed, columns typed,
dates as days since 1970-01-01, NaN where a cell is missing); categorical cells are handed over as their
text ("" where missing), and subject ids are the index column's text as written (leading zeros kept).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

from .registry import DatasetFormatError
from .tables import Table, read_table

MAX_BYTES = 64 << 20
"""A demographics table larger than this is refused: 64 MiB is millions of subjects."""


@dataclass
class Demographics:
    """The parsed table: column types, rows by subject id, ids seen more than once (left out).

        read_demographics(path, "participant_id").rows["sub-001"]["age"]
    """

    index_col: str
    columns: dict[str, str]
    rows: dict[str, dict[str, float | str]]
    duplicates: list[str] = field(default_factory=list)


def read_demographics(path: str | Path, index_col: str) -> Demographics:
    """Parse the table; `DatasetFormatError` for a file that is too large, malformed, or without `index_col`."""
    p = Path(path)
    try:
        if p.stat().st_size > MAX_BYTES:
            raise DatasetFormatError(f"demographics file '{p.name}' is over {MAX_BYTES >> 20} MiB")
    except OSError as exc:
        raise DatasetFormatError(f"demographics file '{p.name}' cannot be read ({exc.strerror})") from None
    table = read_table(p)
    if index_col not in table.columns:
        raise DatasetFormatError(f"index column '{index_col}' is not in the demographics file; "
                                 f"its columns: {', '.join(table.columns)}")  # fmt: skip
    ids = _index_cells(p, table.delimiter, table.columns.index(index_col))
    if len(ids) != table.data.shape[0]:
        raise DatasetFormatError(f"demographics file '{p.name}' changed while it was read")
    columns = {c: table.kinds[c] for c in table.columns if c != index_col}
    rows: dict[str, dict[str, float | str]] = {}
    seen: set[str] = set()
    duplicates: set[str] = set()
    for i, subject in enumerate(ids):
        if not subject:
            continue
        if subject in seen:
            duplicates.add(subject)
        seen.add(subject)
        rows[subject] = {c: _value(table, c, float(table.data[i, j]))
                         for j, c in enumerate(table.columns) if c != index_col}  # fmt: skip
    for subject in duplicates:  # which of two rows is right is not ours to guess
        rows.pop(subject, None)
    return Demographics(index_col, columns, rows, sorted(duplicates))


def _index_cells(p: Path, delimiter: str, column: int) -> list[str]:
    """The index column as written, row for row as `read_table` kept them (blank lines skipped)."""
    with p.open(newline="", encoding="utf-8-sig") as f:
        rows = [row for row in csv.reader(f, delimiter=delimiter) if row and any(c.strip() for c in row)]
    return [row[column].strip() for row in rows[1:]]


def _value(table: Table, column: str, code: float) -> float | str:
    if table.kinds[column] != "categorical":
        return code
    return "" if math.isnan(code) else table.labels[column][int(code)]
