"""Quantising codecs of one tensor's delta: float16 and int8 with a per-tensor scale (`codecs.py` says when
each is used). Each codec turns a float32 array into named parts and back, in numpy (the node's daemon encodes
without torch; the researcher decodes the same way and hands torch the result without a copy); `decode` checks
what a node sent (dtype, shape, range, finite) and raises `CodecError`, never trusting the blob.

    parts = Int8Codec("nearest").encode(delta)          # {"q": int8 codes, "s": float32 scale}
    Int8Codec("nearest").decode(parts, delta.shape, "fc.weight") == dequantised delta
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from .arrays import dtype_name
from .codecs import CodecError

Parts = Mapping[str, np.ndarray]

FLOAT16_MAX = 65504.0
FLOAT32_MAX = float(np.finfo(np.float32).max)
INT8_LEVELS = 127
"""Codes in [-127, 127]: symmetric, so that 0 is exact and -128 (which nothing produces) is refused."""


def expect(parts: Parts, key: str, dtype: type | np.dtype, shape: tuple[int, ...], name: str) -> np.ndarray:
    """The part `key` of tensor `name`, with exactly this dtype and shape."""
    t, want = parts[key], np.dtype(dtype)
    if t.dtype != want or tuple(t.shape) != tuple(shape):
        raise CodecError(f"tensor '{name}': part '{key}' is {dtype_name(t.dtype)} {tuple(t.shape)}, expected "
                         f"{dtype_name(want)} {tuple(shape)}")  # fmt: skip
    return t


def finite(t: np.ndarray, what: str) -> np.ndarray:
    if t.size and not np.isfinite(t).all():
        raise CodecError(f"{what} holds NaN or infinity")
    return t


SUBNORMAL_SHARE = 0.1
"""Above this share of float16-subnormal entries, `to_float16` casts them itself."""


def to_float16(x: np.ndarray) -> np.ndarray:
    """`x.astype(np.float16)` (finite float32, within +-65504), the same bits, faster where many entries are
    float16 subnormals: numpy's cast takes a slow path on each of them, and a subnormal is exactly
    `rint(|x| * 2^24)` in its 10 low bits (ties to even, as the cast rounds).

    Measured (10 M entries, 2026-11-30, load 3-5): |x| ~ 1: numpy 31 ms; ~1e-3 (5 % subnormal): 65 ms; ~1e-4
    (half): 820 ms, this 300 ms; ~1e-5: 710 ms, this 136 ms. torch takes 3-5 ms; a cast written wholly with
    integer operations 73-133 ms.
    """
    small = np.abs(x) < np.float32(2.0**-14)
    if np.count_nonzero(small) <= SUBNORMAL_SHARE * x.size:
        return x.astype(np.float16)
    h = np.where(small, np.float32(0), x).astype(np.float16)
    tiny = x[small]
    bits = np.rint(np.abs(tiny) * np.float32(2.0**24)).astype(np.uint16)
    bits |= (tiny.view(np.uint32) >> 16).astype(np.uint16) & np.uint16(0x8000)  # the sign
    h.view(np.uint16)[small] = bits
    return h


class Float16Codec:
    """The delta in float16, saturated at +-65504 (an overflow would become infinity and be refused).

    numpy's float32 -> float16 cast is slower than torch's, and slowest on what becomes a float16 subnormal
    (|x| < 2^-14): see `to_float16`.

        Float16Codec().decode(Float16Codec().encode(x), x.shape, "w")   # x to float16's precision
    """

    parts = ("h",)

    def encode(self, x: np.ndarray, generator: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        # the clip's copy only where something overflows: 10 M entries in 0.04 s, against 0.06 s clipping always
        if x.size and (float(x.max()) > FLOAT16_MAX or float(x.min()) < -FLOAT16_MAX):
            x = np.asarray(np.clip(x, -FLOAT16_MAX, FLOAT16_MAX))  # np.clip makes a 0-d array a scalar
        return {"h": to_float16(x)}

    def decode(self, parts: Parts, shape: tuple[int, ...], name: str) -> np.ndarray:
        return finite(expect(parts, "h", np.float16, shape, name), f"tensor '{name}'").astype(np.float32)


class Int8Codec:
    """int8 codes q and one float32 scale s = max|x| / 127; x ~ q * s. `nearest` rounds to the closest code
    (error <= s / 2, ties to even); `stochastic` rounds up with probability frac(x / s) (error < s, E[q * s] = x).

        Int8Codec("stochastic").encode(x, generator)    # {"q": int8 x.shape, "s": float32 []}
    """

    parts = ("q", "s")

    def __init__(self, rounding: str = "nearest") -> None:
        self.rounding = rounding

    def encode(self, x: np.ndarray, generator: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        peak = float(np.abs(x).max()) if x.size else 0.0
        scale = peak / INT8_LEVELS
        if scale == 0.0 or not math.isfinite(scale):  # all zeros (an untouched layer): codes 0, scale 0
            return {"q": np.zeros(x.shape, dtype=np.int8), "s": np.array(0.0, dtype=np.float32)}
        y = x.astype(np.float32)  # then in place (0-d arrays stay arrays): one 40 MB buffer for 10 M parameters
        y /= np.float32(scale)
        if self.rounding == "stochastic":
            y += (generator or np.random.default_rng()).random(y.shape, dtype=np.float32)
            np.floor(y, out=y)
        else:
            np.rint(y, out=y)
        np.clip(y, -INT8_LEVELS, INT8_LEVELS, out=y)
        return {"q": y.astype(np.int8), "s": np.array(scale, dtype=np.float32)}

    def decode(self, parts: Parts, shape: tuple[int, ...], name: str) -> np.ndarray:
        q = expect(parts, "q", np.int8, shape, name)
        s = finite(expect(parts, "s", np.float32, (), name), f"tensor '{name}': the scale")
        scale = float(s)
        # a scale whose product with 127 overflows float32 would decode to infinity
        if scale < 0 or not math.isfinite(scale * INT8_LEVELS) or scale * INT8_LEVELS > FLOAT32_MAX:
            raise CodecError(f"tensor '{name}': scale {scale!r} is outside [0, float32 max / 127]")
        if q.size and int(q.min()) < -INT8_LEVELS:
            raise CodecError(f"tensor '{name}': code -128 is outside the codec's range [-127, 127]")
        out = q.astype(np.float32)
        out *= np.float32(scale)
        return out
