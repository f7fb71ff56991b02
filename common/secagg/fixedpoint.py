"""Fixed-point encoding of float updates as integers mod 2^64, the ring the masks live in.

A node sends `n_i * q(clip(delta_i))`, with q(v) = round(v * 2^f) and `n_i` its sample count; the researcher
unmasks the sum S = sum_i n_i q_i and divides by 2^f * sum_i n_i. The weights n_i travel in clear (TrainReply's
`sample_size`): the researcher already knows each node's row count from the search (DatasetInfo.shape) and
checks the claimed count against it, so masking it would hide nothing and would cost a second masked vector.

Error bound: for every coordinate inside the clipping range, |decoded - weighted mean| <= 2^-(f+1) (each node's
rounding is at most half a step; a weighted mean of them too) plus float64 rounding of the division
(|mean| * 2^-52). With the default f = 32 that is 1.2e-10, far below float32's resolution near 1 (6e-8).
Coordinates outside [-c, c] are clipped (the node reports how many). The sum must not wrap: sum_i n_i * c * 2^f
< 2^63, i.e. at most 2^28 samples in a round with the defaults (c = 8, f = 32); `capacity` says how many.

    fp = FixedPoint(clipping_range=8.0, fraction_bits=32)
    enc, clipped = fp.encode(np.array([0.25, -1.5]), weight=10)
    fp.decode(enc, total_weight=10)          # array([ 0.25, -1.5 ])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import SecaggError

MODULUS_BITS = 64
_HALF = 1 << (MODULUS_BITS - 1)


@dataclass(frozen=True)
class FixedPoint:
    """The encoding's parameters: values are clipped to [-clipping_range, clipping_range] and kept with
    `fraction_bits` binary digits after the point.

        FixedPoint(4.0, 24).capacity   # the most samples one round may weigh in without wrapping
    """

    clipping_range: float = 8.0
    fraction_bits: int = 32

    def __post_init__(self) -> None:
        c, f = self.clipping_range, self.fraction_bits
        if not (isinstance(c, int | float) and math.isfinite(c) and c > 0):
            raise SecaggError(f"clipping_range must be a positive number, got {c!r}")
        if not (isinstance(f, int) and 0 <= f <= 52):
            raise SecaggError(f"fraction_bits must be an integer in 0..52, got {f!r}")
        if self.max_step > _HALF >> 1:
            raise SecaggError(f"clipping_range * 2^fraction_bits = {c * 2.0**f:.3g} leaves no room for weights")

    @property
    def max_step(self) -> int:
        """The largest |q(v)| after clipping."""
        return math.ceil(self.clipping_range * 2.0**self.fraction_bits)

    @property
    def capacity(self) -> int:
        """The largest sum of weights (samples) whose weighted sum cannot wrap around 2^63."""
        return (_HALF - 1) // self.max_step

    @property
    def error_bound(self) -> float:
        """Per coordinate, inside the clipping range: the rounding error of the decoded weighted mean."""
        return 2.0 ** -(self.fraction_bits + 1)

    def encode(self, values: np.ndarray, weight: int) -> tuple[np.ndarray, int]:
        """`weight * q(clip(values))` as uint64 (two's complement mod 2^64), and how many values were clipped."""
        if not 0 <= weight <= self.capacity:
            raise SecaggError(f"weight {weight} is outside 0..{self.capacity} (the encoding's capacity)")
        v = np.asarray(values, dtype=np.float64)
        if not np.isfinite(v).all():
            raise SecaggError("cannot encode NaN or infinite values")
        c = float(self.clipping_range)
        clipped = int(np.count_nonzero(np.abs(v) > c))
        q = np.rint(np.clip(v, -c, c) * 2.0**self.fraction_bits).astype(np.int64)
        return (q * np.int64(weight)).view(np.uint64), clipped

    def decode(self, total: np.ndarray, total_weight: int) -> np.ndarray:
        """The weighted mean from the unmasked sum of encodings of nodes whose weights add to `total_weight`."""
        if not 0 < total_weight <= self.capacity:
            raise SecaggError(f"total weight {total_weight} is outside 1..{self.capacity}")
        signed = np.asarray(total, dtype=np.uint64).view(np.int64).astype(np.float64)
        return signed / 2.0**self.fraction_bits / float(total_weight)
