"""Who masks with whom: every pair (SecAgg), or a k-regular graph (SecAgg+, Bell et al. 2020).

With `degree` k (even, below n - 1) node i of the sorted party list is joined to the k/2 parties on each side
of it on a ring: each node encrypts shares to, and masks with, k others instead of n - 1, so its share-stage
traffic and its masking cost grow with k, not n. The researcher picks the parties, hence the graph: the
honest-but-curious researcher of fedsilo's threat model (docs/security.md).

    neighbours(["a", "b", "c", "d", "e"], degree=2)["a"]   # {"b", "e"}
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import SecaggError


def neighbours(parties: Sequence[str], degree: int | None = None) -> dict[str, set[str]]:
    """Each party's neighbours (never itself); `degree` None or >= n - 1: every other party."""
    order = sorted(parties)
    n = len(order)
    if len(set(order)) != n:
        raise SecaggError("the party list has duplicates")
    if degree is None or degree >= n - 1:
        return {p: set(order) - {p} for p in order}
    if degree < 2 or degree % 2:
        raise SecaggError(f"degree must be an even number >= 2, got {degree}")
    half = degree // 2
    return {p: {order[(i + d) % n] for d in range(-half, half + 1) if d} for i, p in enumerate(order)}
