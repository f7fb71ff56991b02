"""Clinical tables without torch: delimiter sniffing, numeric / categorical / date columns, one float matrix.

A column is *numeric* when every present cell parses as a number, a *date* when every present cell
parses with one of `DATE_FORMATS` (the first format that fits all of them), else *categorical*.
Missing cells (`MISSING_MARKERS`: empty, NA, NaN, null, ...) do not count against a type.

Encoding into `Table.data` (float64, NaN for missing), the same on every node:
- numeric: the number;
- date: days since 1970-01-01 (fractional with a time of day);
- categorical: the label's index in `categories[column]` when the caller gives that list (a plan does,
  so that "M" is the same code at every hospital), else its index among the file's own labels sorted
  as text (stable for one file, but a node missing a label shifts the others: plans should pass it).

    t = read_table("adni.csv")               # delimiter sniffed: "," ";" tab or "|"
    t.kinds                                  # {"AGE": "numeric", "SEX": "categorical", "EXAMDATE": "date", ...}
    t.data[:, t.columns.index("SEX")]        # 0.0 / 1.0 for F / M
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from .csvfiles import MISSING_MARKERS, cached_parse, read_csv
from .registry import DatasetFormatError

DELIMITERS = ",;\t|"
"""What the sniffer chooses among."""
ALLOWED_DELIMITERS = ",;\t|: "
_ALIASES = {"tab": "\t", "\\t": "\t", "space": " "}
DATE_FORMATS = ("%Y-%m-%d", "%Y/%m/%d", "%d/%m/%Y", "%d.%m.%Y", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S")
"""Tried in this order; day-first before month-first: "03/04/2020" is 3 April (European consortia)."""
SNIFF_BYTES = 16 << 10
_ISO_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass
class Table:
    """A parsed table: `data` rows x columns float64 (see the module doc for the encoding).

    t = read_table("adni.csv"); t.missing()      # {"AGE": 1, "MMSE": 1}
    """

    columns: list[str]
    kinds: dict[str, str]
    data: np.ndarray
    delimiter: str
    labels: dict[str, list[str]] = field(default_factory=dict)
    """Categorical columns: the label of each code."""
    label_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    date_formats: dict[str, str] = field(default_factory=dict)
    fixed: set[str] = field(default_factory=set)
    """Categorical columns coded by labels the caller gave (`read_table(categories=...)`)."""

    def copy(self) -> Table:
        labels = {k: list(v) for k, v in self.labels.items()}
        counts = {k: dict(v) for k, v in self.label_counts.items()}
        return Table(list(self.columns), dict(self.kinds), self.data.copy(), self.delimiter, labels, counts,
                     dict(self.date_formats), set(self.fixed))  # fmt: skip

    def missing(self) -> dict[str, int]:
        """Cells per column that are missing or not finite, columns without any left out."""
        counts = np.count_nonzero(~np.isfinite(self.data), axis=0)
        return {c: int(n) for c, n in zip(self.columns, counts, strict=True) if n}

    def complete_rows(self) -> np.ndarray:
        """Boolean mask of the rows without a missing or non-finite cell."""
        return np.isfinite(self.data).all(axis=1)


_SNIFFED: OrderedDict[tuple[str, int, int, int], str] = OrderedDict()
SNIFF_CACHE_ENTRIES = 64


def sniff_delimiter(path: str | Path) -> str:
    """The delimiter of a CSV file: csv.Sniffer over its first 16 KiB among `DELIMITERS`, else the one
    the header line holds most of, else ",". Kept per file version (inode, mtime, size): the sniffer took 7 ms
    of every round's `CsvDataset` (peerbench-v1 shard, 2026-11-30), and the node's warm worker sniffs the
    round's file before each round's process is forked."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise DatasetFormatError(f"{path}: cannot be read ({exc.strerror})") from None
    key = (os.fspath(path), st.st_ino, st.st_mtime_ns, st.st_size)
    found = _SNIFFED.get(key)
    if found is None:
        found = _SNIFFED[key] = _sniff(path)
        while len(_SNIFFED) > SNIFF_CACHE_ENTRIES:
            _SNIFFED.popitem(last=False)
    return found


def _sniff(path: str | Path) -> str:
    try:
        with Path(path).open(newline="", encoding="utf-8-sig") as f:
            sample = f.read(SNIFF_BYTES)
    except UnicodeDecodeError:
        raise DatasetFormatError(f"{path}: not a text CSV file") from None
    except OSError as exc:
        raise DatasetFormatError(f"{path}: cannot be read ({exc.strerror})") from None
    if len(sample) == SNIFF_BYTES and "\n" in sample:
        sample = sample[: sample.rindex("\n")]  # no half line for the sniffer
    try:
        return csv.Sniffer().sniff(sample, delimiters=DELIMITERS).delimiter
    except csv.Error:
        header = sample.split("\n", 1)[0]
        counts = {d: header.count(d) for d in DELIMITERS}
        best = max(counts, key=lambda d: counts[d])
        return best if counts[best] else ","


def read_table(
    path: str | Path,
    delimiter: str | None = None,
    categories: Mapping[str, Sequence[str]] | None = None,
    *,
    copy: bool = True,
) -> Table:
    """Parse a CSV with a header row into a typed `Table` (cached by content like `read_csv`). `copy=False`
    returns the cached table itself, for callers that only read it (`CsvDataset`: a copy of 50,000 x 17
    cells is 6.8 MB a round)."""
    delimiter = _ALIASES.get(delimiter, delimiter) if delimiter else sniff_delimiter(path)
    if len(delimiter) != 1:
        raise DatasetFormatError(f"delimiter must be one character, got {delimiter!r}")
    if delimiter not in ALLOWED_DELIMITERS:  # a quote, a letter or a newline cannot delimit (the csv module raises)
        raise DatasetFormatError(f"delimiter {delimiter!r} is not one of: , ; | : space tab")
    fixed = {str(k): [str(x) for x in v] for k, v in (categories or {}).items()}
    kind = f"table:{delimiter}:{sorted(fixed.items())!r}"
    table = cached_parse(path, kind, lambda p: _parse(p, delimiter, fixed))
    return table.copy() if copy else table


def _parse(p: Path, delimiter: str, categories: dict[str, list[str]]) -> Table:
    try:  # every column numeric: numpy's C parser (and read_csv's cache), 20x faster than the cell loop below
        columns, data = read_csv(p, delimiter)
        table = Table(columns, {c: "numeric" for c in columns}, data, delimiter)
    except DatasetFormatError as exc:
        if "numeric" not in str(exc):
            raise
        table = _parse_cells(p, delimiter)
    _apply_categories(table, categories, p)
    return table


def _read_cells(p: Path, delimiter: str) -> tuple[list[str], list[list[str]]]:
    try:
        with p.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=delimiter)
            header = next(reader, None)
            if not header or not any(h.strip() for h in header):
                raise DatasetFormatError(f"{p}: empty file or missing header row")
            columns = [h.strip() for h in header]
            rows = []
            for row in reader:
                if not row or not any(c.strip() for c in row):
                    continue
                if len(row) != len(columns):
                    raise DatasetFormatError(
                        f"{p}: line {reader.line_num} has {len(row)} values but the header {len(columns)} columns "
                        f"(delimiter {delimiter!r})"
                    )
                rows.append(row)
    except UnicodeDecodeError:
        raise DatasetFormatError(f"{p}: not a text CSV file") from None
    except csv.Error as exc:
        raise DatasetFormatError(f"{p}: not a CSV file ({exc})") from None
    if len(set(columns)) != len(columns):
        raise DatasetFormatError(f"{p}: duplicate column names in the header")
    if not rows:
        raise DatasetFormatError(f"{p}: no data rows")
    return columns, rows


def _parse_cells(p: Path, delimiter: str) -> Table:
    columns, rows = _read_cells(p, delimiter)
    data = np.empty((len(rows), len(columns)), dtype=np.float64)
    table = Table(columns, {}, data, delimiter)
    for j, name in enumerate(columns):
        cells = [row[j].strip() for row in rows]
        present = [c for c in cells if c.lower() not in MISSING_MARKERS]
        numbers = _as_numbers(cells)
        if numbers is not None:
            table.kinds[name], data[:, j] = "numeric", numbers
            continue
        dates = _dates(set(present))
        if dates is not None:
            fmt, days = dates
            table.kinds[name], table.date_formats[name] = "date", fmt
            data[:, j] = [days.get(c, math.nan) for c in cells]
            continue
        table.kinds[name] = "categorical"
        labels = sorted(set(present))
        code = {label: float(i) for i, label in enumerate(labels)}
        data[:, j] = [code.get(c, math.nan) for c in cells]
        table.labels[name] = labels
        table.label_counts[name] = _counts(present)
    return table


def _counts(values: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


def _as_numbers(cells: list[str]) -> list[float] | None:
    out = []
    for c in cells:
        if c.lower() in MISSING_MARKERS:
            out.append(math.nan)
            continue
        try:
            out.append(float(c))
        except ValueError:
            return None
    return out


def _dates(values: set[str]) -> tuple[str, dict[str, float]] | None:
    """(format, days since 1970-01-01 per value) when every value is a date in one of `DATE_FORMATS`.

    Each distinct value is parsed once, ISO days by numpy: strptime took 12 of 16 s (profiled, machine
    loaded) on 50,000 rows of one date column; this takes 0.1 s."""
    if not values:
        return None
    uniq = sorted(values)
    if all(_ISO_DAY.fullmatch(v) for v in uniq):
        try:  # numpy checks the calendar too (2021-02-30 is refused)
            days = np.array(uniq, dtype="datetime64[D]").astype(np.int64)
        except ValueError:
            return None
        return "%Y-%m-%d", {v: float(d) for v, d in zip(uniq, days, strict=True)}
    for fmt in DATE_FORMATS:
        try:
            return fmt, {v: _days(v, fmt) for v in uniq}
        except ValueError:
            continue
    return None


def _days(cell: str, fmt: str) -> float:
    return (datetime.strptime(cell, fmt).replace(tzinfo=UTC) - _EPOCH).total_seconds() / 86400.0


def _apply_categories(table: Table, categories: dict[str, list[str]], p: Path) -> None:
    """Re-code the categorical columns the caller fixed the labels of; a label outside the list is refused
    (counted, never named: the message may reach a researcher)."""
    for name, wanted in categories.items():
        if name not in table.kinds:
            raise DatasetFormatError(f"{p}: categories given for column '{name}', which the table does not have")
        if table.kinds[name] != "categorical":
            raise DatasetFormatError(f"{p}: categories given for column '{name}', which is {table.kinds[name]}")
        j = table.columns.index(name)
        mapping = np.array([wanted.index(lb) if lb in wanted else -1 for lb in table.labels[name]], dtype=np.float64)
        col = table.data[:, j]
        present = np.isfinite(col)
        recoded = np.full_like(col, math.nan)
        recoded[present] = mapping[col[present].astype(np.int64)]
        unknown = int(np.count_nonzero(recoded[present] < 0))
        if unknown:
            raise DatasetFormatError(
                f"{p}: column '{name}' has {unknown} row(s) whose label is not in the categories given "
                f"({len(wanted)} labels)"
            )
        table.data[:, j] = recoded
        table.labels[name] = list(wanted)
        table.fixed.add(name)
