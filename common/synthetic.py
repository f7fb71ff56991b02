"""Synthetic tabular cohorts: the data of the quickstart's hospitals, of the tutorial notebook's
held-out test set and of the tests. Never real patients; no network, no files unless asked.

    rng = np.random.default_rng(2024)
    table = synthetic_cohort(rng, rows=1500, positive_share=0.2)   # features..., label
    write_cohort_csv("hospital-a.csv", table)                        # f0..f15,label with a header
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FEATURES = 16
"""Feature columns `f0` ... `f15`; the last column is the binary `label`."""

_DIRECTION_SEED = 7  # the class-separating direction is the same for every cohort


def synthetic_cohort(rng: np.random.Generator, rows: int, positive_share: float) -> np.ndarray:
    """Two overlapping classes with a non-linear boundary: `rows` x (FEATURES + 1), the label last.

    `positive_share` sets the label skew (hospitals with different case mixes); the boundary itself
    is shared, so a model trained on one cohort transfers to another.
    """
    direction = np.random.default_rng(_DIRECTION_SEED).standard_normal(FEATURES)
    direction /= np.linalg.norm(direction)
    y = (rng.random(rows) < positive_share).astype(np.int64)
    x = rng.standard_normal((rows, FEATURES)) + np.outer(2 * y - 1, direction) * 1.2
    x[:, 0] += 0.8 * (x[:, 1] ** 2 - 1) * (2 * y - 1)  # a curved interaction an MLP can exploit
    return np.column_stack([x.astype(np.float32), y])


def write_cohort_csv(path: str | Path, table: np.ndarray) -> Path:
    """Write a cohort as a numeric CSV with the header `f0,...,f15,label` (what `CsvDataset` reads)."""
    path = Path(path)
    header = ",".join([f"f{i}" for i in range(FEATURES)] + ["label"])
    fmt = ["%.6g"] * FEATURES + ["%d"]
    np.savetxt(path, table, delimiter=",", header=header, comments="", fmt=fmt)
    return path


def features_and_labels(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split a cohort table into float32 features and int64 labels."""
    return table[:, :FEATURES].astype(np.float32), table[:, FEATURES].astype(np.int64)


def synthetic_classes(rng: np.random.Generator, rows: int, num_classes: int, spread: float = 1.0) -> np.ndarray:
    """`num_classes` Gaussian classes in FEATURES dimensions, balanced in expectation: `rows` x (FEATURES + 1).

    The class centres are fixed (drawn from `_DIRECTION_SEED`), so tables drawn with different `rng`s are
    samples of one task; `spread` is the noise around each centre (centres are about 1.4 apart per class
    pair at spread 1, so the classes overlap and a linear model cannot separate them perfectly).
    `write_cohort_csv` writes it like a cohort (labels 0 ... num_classes - 1).
    """
    centres = np.random.default_rng(_DIRECTION_SEED).standard_normal((num_classes, FEATURES))
    y = rng.integers(0, num_classes, rows)
    x = centres[y] + spread * rng.standard_normal((rows, FEATURES))
    return np.column_stack([x.astype(np.float32), y])


def dirichlet_label_split(
    rng: np.random.Generator, labels: np.ndarray, num_parts: int, alpha: float, min_rows: int = 1
) -> list[np.ndarray]:
    """Row indices of `labels` split into `num_parts` with label skew Dirichlet(alpha) (Hsu et al. 2019).

    For each class, the shares of its rows that go to each part are drawn from Dirichlet(alpha, ..., alpha):
    alpha = 0.1 gives most parts one or two dominant classes, large alpha an even (IID-like) split. The draw
    is repeated until every part has at least `min_rows` rows (at most 1000 tries, else `ValueError`).

        table = synthetic_classes(rng, 2000, 10)
        parts = dirichlet_label_split(rng, table[:, -1].astype(int), 5, alpha=0.1, min_rows=50)
    """
    if num_parts < 1 or alpha <= 0 or min_rows * num_parts > len(labels):
        raise ValueError(f"cannot split {len(labels)} rows into {num_parts} parts of >= {min_rows} (alpha {alpha})")
    classes = np.unique(labels)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(num_parts)]
        for c in classes:
            rows = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(num_parts, alpha)))[:-1] * len(rows)).astype(int)
            for part, chunk in zip(parts, np.split(rows, cuts), strict=True):
                part.extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_rows:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError(f"no Dirichlet({alpha}) split of {len(labels)} rows gave {num_parts} parts of >= {min_rows} rows")
