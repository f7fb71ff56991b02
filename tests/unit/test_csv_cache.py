"""`read_csv` keeps parsed files by content: a changed file is read again, callers cannot alter the cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from fedsilo.common.datasets import CsvDataset, DatasetFormatError, read_csv
from fedsilo.common.datasets import csvfiles as datasets


def _write(path: Path, rows: list[tuple[float, int]]) -> Path:
    path.write_text("x,label\n" + "".join(f"{x},{y}\n" for x, y in rows), encoding="utf-8")
    return path


def test_same_content_is_parsed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path / "a.csv", [(0.5, 1), (1.5, 0)])
    calls = []
    parse = datasets._parse_csv
    monkeypatch.setattr(datasets, "_parse_csv", lambda p, *args: calls.append(p) or parse(p, *args))
    first = read_csv(path)
    second = read_csv(path)
    assert first[0] == second[0] == ["x", "label"]
    assert np.array_equal(first[1], second[1])
    assert len(calls) <= 1  # 0 when another test already read the same bytes


def test_a_changed_file_is_read_again(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.csv", [(0.5, 1), (1.5, 0)])
    stat = path.stat()
    assert CsvDataset(path).x.tolist() == [[0.5], [1.5]]
    _write(path, [(2.5, 1), (3.5, 0)])  # same size, and the old timestamps put back
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert CsvDataset(path).x.tolist() == [[2.5], [3.5]]


def test_callers_get_their_own_array(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.csv", [(0.25, 1), (0.75, 0)])
    _, data = read_csv(path)
    data[:] = -1
    _, again = read_csv(path)
    assert again.tolist() == [[0.25, 1.0], [0.75, 0.0]]


def test_errors_are_not_cached(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("x,label\n1,a\n", encoding="utf-8")
    for _ in range(2):
        with pytest.raises(DatasetFormatError, match="numeric"):
            read_csv(path)


def test_large_files_are_not_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "CSV_CACHE_MAX_FILE", 8)
    path = _write(tmp_path / "a.csv", [(0.125, 1)])
    before = len(datasets._csv_cache)
    read_csv(path)
    assert len(datasets._csv_cache) == before
