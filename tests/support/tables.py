"""Small CSV datasets the node tests register."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_sign_csv(path: Path, rows: int, seed: int = 0) -> Path:
    """`a,b,c,d,label`: four standard-normal features, label 1 where `a` > 0 (a logistic regression learns it).

        write_sign_csv(tmp_path / "d.csv", rows=64)
    """
    x = np.random.default_rng(seed).normal(size=(rows, 4))
    path.write_text("a,b,c,d,label\n" + "".join(",".join(f"{v:.4f}" for v in r) + f",{int(r[0] > 0)}\n" for r in x))
    return path
