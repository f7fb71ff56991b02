"""Shamir's t-out-of-n secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

Any `threshold` shares give the secret back; fewer are consistent with every secret (the polynomial's other
coefficients are uniform). 2^521 - 1 is a Mersenne prime larger than any 32-byte secret, so a secret is one
field element and needs no splitting into chunks.

    shares = split(secret, n=5, threshold=3)
    assert combine(shares[1:4], threshold=3) == secret
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import SecaggError

PRIME = (1 << 521) - 1
SECRET_BYTES = 32
_Y_BYTES = 66  # ceil(521 / 8)
SHARE_BYTES = 2 + _Y_BYTES
MAX_SHARES = 65535


@dataclass(frozen=True)
class Share:
    """One point (x, y) of the sharing polynomial; x is 1..65535 (x = 0 would be the secret itself).

        Share.from_bytes(share.to_bytes()) == share
    """

    x: int
    y: int

    def to_bytes(self) -> bytes:
        return self.x.to_bytes(2, "big") + self.y.to_bytes(_Y_BYTES, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        if len(data) != SHARE_BYTES:
            raise SecaggError(f"a share is {SHARE_BYTES} bytes, got {len(data)}")
        x, y = int.from_bytes(data[:2], "big"), int.from_bytes(data[2:], "big")
        if not 1 <= x <= MAX_SHARES or y >= PRIME:
            raise SecaggError("share out of range")
        return cls(x, y)


def split(secret: bytes, n: int, threshold: int, xs: Sequence[int] | None = None) -> list[Share]:
    """`n` shares of `secret` (32 bytes), any `threshold` of which reconstruct it; `xs` picks the points
    (default 1..n; each party's point is its 1-based position in the round's party list)."""
    if len(secret) != SECRET_BYTES:
        raise SecaggError(f"secrets are {SECRET_BYTES} bytes, got {len(secret)}")
    points = list(xs) if xs is not None else list(range(1, n + 1))
    if len(points) != n or len(set(points)) != n or not all(1 <= x <= MAX_SHARES for x in points):
        raise SecaggError("share points must be n distinct integers in 1..65535")
    if not 1 <= threshold <= n:
        raise SecaggError(f"threshold {threshold} must be between 1 and n = {n}")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return [Share(x, _evaluate(coefficients, x)) for x in points]


def combine(shares: Sequence[Share], threshold: int) -> bytes:
    """The secret from at least `threshold` shares (Lagrange interpolation at 0 over the first `threshold`)."""
    if len({s.x for s in shares}) != len(shares):
        raise SecaggError("two shares have the same point")
    if len(shares) < threshold:
        raise SecaggError(f"{len(shares)} share(s) cannot reconstruct a secret shared with threshold {threshold}")
    secret = interpolate_at_zero(shares[:threshold])
    if secret >= 1 << (8 * SECRET_BYTES):
        raise SecaggError("the shares do not reconstruct a 32-byte secret (a share is wrong)")
    return secret.to_bytes(SECRET_BYTES, "big")


def interpolate_at_zero(shares: Sequence[Share]) -> int:
    """The polynomial through `shares` evaluated at 0 (whatever their number: with too few, a random value)."""
    total = 0
    for i, si in enumerate(shares):
        num, den = 1, 1
        for j, sj in enumerate(shares):
            if i != j:
                num = num * (-sj.x) % PRIME
                den = den * (si.x - sj.x) % PRIME
        total = (total + si.y * num * pow(den, -1, PRIME)) % PRIME
    return total


def _evaluate(coefficients: list[int], x: int) -> int:
    acc = 0
    for c in reversed(coefficients):
        acc = (acc * x + c) % PRIME
    return acc
