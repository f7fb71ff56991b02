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
