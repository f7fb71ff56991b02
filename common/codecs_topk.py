"""Top-k sparsification of one tensor's delta (FedLab's `TopkCompressor`): the `fraction` of entries with the
largest magnitude, as int32 flat indices (ascending) and their float32 values; the rest is dropped (error
feedback on the node sends it later). `decode` checks every index a node sent before it writes one.

    codec = TopkCodec(0.01)
    parts = codec.encode(delta)                 # {"i": int32 [k], "v": float32 [k]}, k = ceil(0.01 * numel)
    codec.decode(parts, delta.shape, "fc.weight")   # dense float32, zeros where nothing was sent
"""

from __future__ import annotations

import math

import numpy as np

from .arrays import dtype_name
from .codecs import CodecError
from .codecs_quant import Parts, finite

MAX_INDEX = 2**31 - 1


def kept(fraction: float, numel: int) -> int:
    """Entries a tensor of `numel` keeps: at least one of a non-empty tensor, so that every layer moves."""
    return min(numel, max(1, math.ceil(fraction * numel))) if numel else 0


class TopkCodec:
    """The `fraction` largest-magnitude entries of each tensor (see the module docstring)."""

    parts = ("i", "v")

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction

    def encode(self, x: np.ndarray, generator: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        flat = x.reshape(-1)
        if flat.size > MAX_INDEX:
            raise CodecError(f"a tensor of {flat.size} entries is beyond int32 indices")
        k = kept(self.fraction, flat.size)
        # numpy's introselect: 0.12 s for 1 % of 5 M entries against torch.topk's 0.39 s (dev machine, 1 thread)
        index = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :]) if k else np.zeros(0, np.int64)
        return {"i": index.astype(np.int32), "v": flat[index]}

    def decode(self, parts: Parts, shape: tuple[int, ...], name: str) -> np.ndarray:
        index, values = parts["i"], parts["v"]
        numel = math.prod(shape)
        k = kept(self.fraction, numel)
        if index.dtype != np.int32 or values.dtype != np.float32 or index.ndim != 1 or values.ndim != 1:
            got = f"{dtype_name(index.dtype)} {index.shape} and {dtype_name(values.dtype)} {values.shape}"
            raise CodecError(f"tensor '{name}': indices must be 1-D int32 and values 1-D float32, got {got}")
        if index.size != values.size or index.size > k:
            raise CodecError(f"tensor '{name}': {index.size} indices and {values.size} values, expected the "
                             f"same count, at most {k} (fraction {self.fraction:g} of {numel})")  # fmt: skip
        finite(values, f"tensor '{name}': the values")
        out = np.zeros(numel, dtype=np.float32)
        if index.size:
            wide = index.astype(np.int64)
            if int(wide[0]) < 0 or int(wide[-1]) >= numel or (index.size > 1 and not bool((np.diff(wide) > 0).all())):
                raise CodecError(f"tensor '{name}': indices must be ascending, distinct and within [0, {numel})")
            out[wide] = values
        return out.reshape(shape)
