"""The researcher's half of update compression (`common/codecs.py`): the experiment's setting, checked once
against its other choices, and the decoding of each node's `params` blob before the algorithm's `add`.

    spec = compression_setting("int8", secagg=None)       # a Compression, or None for plain float32 updates
    params = decode_params(data, global_params, spec)     # CodecError (a SerializationError): node dropped
"""

from __future__ import annotations

from typing import Any

from fedsilo.common.codecs import Compression, CompressionError
from fedsilo.common.codecs_update import decode_update

from .algorithms.base import Params
from .settings import ExperimentError

__all__ = ["Compression", "compression_setting", "decode_params"]


def compression_setting(value: str | Compression | dict[str, Any] | None, secagg: Any = None) -> Compression | None:
    """`Experiment(compression=...)` as a `Compression` (None: off); `ExperimentError` for a bad value or with
    secure aggregation, whose masks add plain fixed-point values and cannot carry a codec's."""
    try:
        spec = Compression.of(value)
    except CompressionError as exc:
        raise ExperimentError(str(exc)) from None
    if spec is not None and secagg is not None:
        raise ExperimentError("compression and secure aggregation do not combine (masks need the plain encoding): "
                              "choose one")  # fmt: skip
    return spec


def decode_params(data: bytes | bytearray | memoryview, global_params: Params, spec: Compression) -> Params:
    """A node's codec blob as the update `add` takes: the global model plus the decoded delta, in its dtypes.
    Wrong codec, names, shapes, indices or a NaN scale raise `CodecError` with the reason."""
    return decode_update(data, global_params, spec)
