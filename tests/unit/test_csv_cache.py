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


@pytest.mark.parametrize("racy_s", [datasets.RACY_S, -1.0])  # -1: every signature trusted at once
def test_a_changed_file_is_read_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, racy_s: float) -> None:
    monkeypatch.setattr(datasets, "RACY_S", racy_s)
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


def _hashes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the files `csvfiles` hashes from here on."""
    calls: list[int] = []
    real = datasets.hashlib.sha256
    monkeypatch.setattr(datasets.hashlib, "sha256", lambda *a: calls.append(1) or real(*a))
    return calls


def test_an_unchanged_file_is_not_hashed_every_round(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job's process reads its dataset every round: a file whose stat signature (size, inode, mtime and ctime in
    ns) is the one it had when hashed, long enough after its last change, is not read again."""
    monkeypatch.setattr(datasets, "RACY_S", -1.0)  # as if hashed more than RACY_S after the file was written
    path = _write(tmp_path / "old.csv", [(0.5, 1), (1.5, 0)])
    hashes = _hashes(monkeypatch)
    for _ in range(3):
        assert CsvDataset(path).x.tolist() == [[0.5], [1.5]]
    assert len(hashes) == 1


def test_a_file_just_written_is_hashed_each_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Within RACY_S of its last change a file could change again inside one timestamp tick: hashed each read."""
    path = _write(tmp_path / "new.csv", [(0.5, 1), (1.5, 0)])
    CsvDataset(path)
    hashes = _hashes(monkeypatch)
    CsvDataset(path)
    assert len(hashes) == 1  # the cache hit, checked against the content again
