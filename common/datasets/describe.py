"""Privacy-safe descriptions: what a node says about a dataset to researchers and shows in its GUI.

A description holds counts, column types, shapes and dtypes; never a value of one patient (no minimum,
maximum or single row), and every count below the node's `min_count` is replaced by the text
"< min_count": a "2" next to a rare category tells a researcher that two patients have it.
Category labels are named only when at least `min_count` rows carry them (a free-text or identifier
column then shows no label at all).

    count_text(3, 5)                                  # "< 5"
    describe_categories({"M": 12, "F": 9, "X": 1}, 5) # {"categories": {"F": 9, "M": 12}, "other": "< 5", ...}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def count_text(n: int, min_count: int) -> int | str:
    """`n` itself when at least `min_count` (or 0: nothing to hide), else "< min_count"."""
    n = int(n)
    return n if n == 0 or n >= min_count else f"< {min_count}"


def suppressed_counts(counts: Mapping[str, int], min_count: int) -> dict[str, int | str]:
    """Each count through `count_text` (keys are column or class names the node chose, not patient values)."""
    return {str(k): count_text(v, min_count) for k, v in counts.items()}


MAX_CATEGORIES = 20
"""Labels shown per categorical column (the most frequent); the others count in `other`. A search reply must
fit one 256 KiB message with every matching dataset (see `tabular.MAX_DESCRIBED_COLUMNS`)."""


def describe_categories(counts: Mapping[str, int], min_count: int, limit: int = MAX_CATEGORIES) -> dict[str, Any]:
    """A categorical column: labels carried by at least `min_count` rows with their counts (the `limit` most
    frequent); the rows of the other labels together as `other`, and how many labels there are (`distinct`)."""
    frequent = sorted(((str(k), int(v)) for k, v in counts.items() if v >= min_count), key=lambda kv: (-kv[1], kv[0]))
    shown = dict(sorted(frequent[:limit]))
    rare = sum(int(v) for v in counts.values()) - sum(shown.values())
    out: dict[str, Any] = {"type": "categorical", "distinct": len(counts), "categories": shown}
    if rare:
        out["other"] = count_text(rare, min_count)
    return out


def describe_samples(shape: list[int], min_count: int) -> tuple[list[int], int | str]:
    """(shape to publish, sample count text): below `min_count` samples the shape is withheld ([]), since its
    first entry is the count. Such a dataset is refused for training too, so nobody needs its count."""
    samples = int(shape[0]) if shape else 0
    text = count_text(samples, min_count)
    return (list(shape) if text == samples else []), text


def missing_text(missing: Mapping[str, int | str]) -> str:
    """'3 missing or non-finite values: age (2), bmi (1)' (counts may be texts such as '< 5')."""
    per_column = ", ".join(f"{c} ({n})" for c, n in missing.items())
    if all(isinstance(n, int) for n in missing.values()):
        return f"{sum(int(n) for n in missing.values())} missing or non-finite values: {per_column}"
    return f"missing or non-finite values: {per_column}"
