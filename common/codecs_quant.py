"""Quantising codecs of one tensor's delta: float16 and int8 with a per-tensor scale (`codecs.py` says when
each is used). Each codec turns a float32 tensor into named parts and back; `decode` checks what a node sent
(dtype, shape, range, finite) and raises `CodecError`, never trusting the blob.

    parts = Int8Codec("nearest").encode(delta)          # {"q": int8 codes, "s": float32 scale}
    Int8Codec("nearest").decode(parts, delta.shape, "fc.weight") == dequantised delta
"""

from __future__ import annotations

import math

import torch

from .codecs import CodecError

Parts = dict[str, torch.Tensor]

FLOAT16_MAX = 65504.0
INT8_LEVELS = 127
"""Codes in [-127, 127]: symmetric, so that 0 is exact and -128 (which nothing produces) is refused."""


def expect(parts: Parts, key: str, dtype: torch.dtype, shape: tuple[int, ...], name: str) -> torch.Tensor:
    """The part `key` of tensor `name`, with exactly this dtype and shape."""
    t = parts[key]
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
        got = f"{t.dtype} {tuple(t.shape)}"
        raise CodecError(f"tensor '{name}': part '{key}' is {got}, expected {dtype} {tuple(shape)}")
    return t


def finite(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise CodecError(f"{what} holds NaN or infinity")
    return t


class Float16Codec:
    """The delta in float16, saturated at +-65504 (an overflow would become infinity and be refused).

        Float16Codec().decode(Float16Codec().encode(x), x.shape, "w")   # x to float16's precision
    """

    parts = ("h",)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Parts:
        return {"h": x.clamp(-FLOAT16_MAX, FLOAT16_MAX).to(torch.float16)}

    def decode(self, parts: Parts, shape: tuple[int, ...], name: str) -> torch.Tensor:
        return finite(expect(parts, "h", torch.float16, shape, name), f"tensor '{name}'").float()


class Int8Codec:
    """int8 codes q and one float32 scale s = max|x| / 127; x ~ q * s. `nearest` rounds to the closest code
    (error <= s / 2); `stochastic` rounds up with probability frac(x / s) (error < s, E[q * s] = x).

        Int8Codec("stochastic").encode(x, generator)    # {"q": int8 x.shape, "s": float32 []}
    """

    parts = ("q", "s")

    def __init__(self, rounding: str = "nearest") -> None:
        self.rounding = rounding

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Parts:
        peak = float(x.abs().max()) if x.numel() else 0.0
        scale = peak / INT8_LEVELS
        if scale == 0.0 or not math.isfinite(scale):  # all zeros (an untouched layer): codes 0, scale 0
            return {"q": torch.zeros(x.shape, dtype=torch.int8), "s": torch.tensor(0.0)}
        y = x / scale  # then in place: one 40 MB buffer for a 10 M-parameter tensor
        if self.rounding == "stochastic":
            y.add_(torch.rand(y.shape, generator=generator)).floor_()
        else:
            y.round_()
        return {"q": y.clamp_(-INT8_LEVELS, INT8_LEVELS).to(torch.int8), "s": torch.tensor(scale, dtype=torch.float32)}

    def decode(self, parts: Parts, shape: tuple[int, ...], name: str) -> torch.Tensor:
        q = expect(parts, "q", torch.int8, shape, name)
        s = finite(expect(parts, "s", torch.float32, (), name), f"tensor '{name}': the scale")
        scale = float(s)
        # a scale whose product with 127 overflows float32 would decode to infinity
        if scale < 0 or not math.isfinite(scale * INT8_LEVELS) or scale * INT8_LEVELS > torch.finfo(torch.float32).max:
            raise CodecError(f"tensor '{name}': scale {scale!r} is outside [0, float32 max / 127]")
        if q.numel() and int(q.min()) < -INT8_LEVELS:
            raise CodecError(f"tensor '{name}': code -128 is outside the codec's range [-127, 127]")
        return q.float().mul_(scale)
