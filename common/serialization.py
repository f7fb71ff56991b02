"""Model parameters on the wire: safetensors only. Nothing received is ever unpickled.

A payload is accepted only when its header parses as a bounded safetensors header whose tensor
entries exactly tile the data area (`parse_header`); pickles, torch.save zip archives and junk fail
that parse, so no byte is sniffed. (Sniffing the first byte refused fedsilo's own payloads: the
8-byte little-endian header length starts with 0x80 whenever it is 128 modulo 256, for example for
`nn.Linear(784, 10)`.)
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from .errors import SerializationError
from .safejson import JSONLimitError, check_json

MAX_HEADER_BYTES = 16 << 20
"""A header entry is about 100 bytes: 16 MiB is room for 150,000 tensors (a ResNet-152 has 900)."""

_DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "C64": "complex64",
}  # fmt: skip
_DTYPES: dict[str, torch.dtype] = {
    name: dtype for name, attr in _DTYPE_NAMES.items() if isinstance(dtype := getattr(torch, attr, None), torch.dtype)
}
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}
_METADATA = "__metadata__"


def params_to_bytes(params: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serialise a state dict (tensors only) to safetensors bytes."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in params.items()}
    return _st_save(tensors, metadata=metadata)


def params_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes; anything else (pickle, torch.save archives, junk) is refused unread."""
    parse_header(data)
    try:
        return _st_load(bytes(data))
    except Exception as exc:  # unreachable after parse_header (a second guard): the Rust loader's own checks
        raise SerializationError(f"refused: invalid safetensors payload ({exc})") from exc


def parse_header(data: bytes) -> dict[str, dict[str, Any]]:
    """The tensor entries of a safetensors payload, checked; `SerializationError` for anything else.

    Checked: the 8-byte length fits the payload and `MAX_HEADER_BYTES`; the header is UTF-8 JSON,
    nested no deeper than `safejson.MAX_DEPTH`, an object without duplicate names; each entry has exactly dtype (a
    known one), shape (non-negative ints) and data_offsets whose span is the tensor's byte size; and
    the spans, sorted, tile the data area from its first byte to the payload's last.
    """
    if len(data) < 8:
        raise SerializationError(f"refused: {len(data)} bytes is too short to be a safetensors payload")
    header_len = int.from_bytes(data[:8], "little")
    if header_len < 2 or header_len > len(data) - 8 or header_len > MAX_HEADER_BYTES:
        raise SerializationError(
            f"refused: not a safetensors payload (header length {header_len} for {len(data)} bytes; "
            "pickles and torch.save archives are never read)"
        )
    try:
        text = bytes(data[8 : 8 + header_len]).decode("utf-8")  # JSON's other encodings are not safetensors
        check_json(text, max_bytes=MAX_HEADER_BYTES)  # depth: safejson.MAX_DEPTH; entries are checked below
        header = json.loads(text, object_pairs_hook=_unique_names)
    except JSONLimitError as exc:
        raise SerializationError(f"refused: safetensors header too large or too deep ({exc})") from None
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError included
        raise SerializationError(f"refused: safetensors header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise SerializationError("refused: safetensors header is not a JSON object")
    metadata = header.pop(_METADATA, None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise SerializationError("refused: safetensors __metadata__ must map names to strings")
    spans = []
    for name, entry in header.items():
        spans.append((*_entry_span(name, entry), name))
    data_len = len(data) - 8 - header_len
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise SerializationError(
                f"refused: tensor '{name}' starts at byte {begin} of the data area, expected {position} "
                "(tensors must tile the data area without gaps or overlaps)"
            )
        position = end
    if position != data_len:
        raise SerializationError(f"refused: tensors cover {position} bytes but the data area holds {data_len}")
    return header


def _entry_span(name: str, entry: Any) -> tuple[int, int]:
    """(begin, end) of one tensor entry, after checking its keys, dtype, shape and byte size."""
    if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
        raise SerializationError(f"refused: tensor '{name}' must have exactly dtype, shape and data_offsets")
    dtype = _DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise SerializationError(f"refused: tensor '{name}' has unsupported dtype {entry['dtype']!r}")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise SerializationError(f"refused: tensor '{name}' shape must be a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise SerializationError(f"refused: tensor '{name}' data_offsets must be two non-negative integers")
    begin, end = offsets
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise SerializationError(
            f"refused: tensor '{name}' spans {end - begin} bytes but {entry['dtype']} {shape} needs "
            f"{math.prod(shape) * dtype.itemsize}"
        )
    return begin, end


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _unique_names(items: list[tuple[str, Any]]) -> dict[str, Any]:
    """Refuse a header naming a tensor twice: Python keeps the last entry, the Rust loader may not."""
    out = dict(items)
    if len(out) != len(items):
        raise ValueError(f"a name appears twice among {sorted(k for k, _ in items)[:5]}")
    return out


def check_compatible(received: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    """Raise if received parameters do not match the model's names, shapes and dtypes."""
    missing = reference.keys() - received.keys()
    extra = received.keys() - reference.keys()
    if missing or extra:
        raise SerializationError(
            f"parameter names differ from the model: missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}"
        )
    for k, ref in reference.items():
        got = received[k]
        if tuple(got.shape) != tuple(ref.shape) or got.dtype != ref.dtype:
            raise SerializationError(
                f"parameter '{k}': got {tuple(got.shape)} {got.dtype}, model has {tuple(ref.shape)} {ref.dtype}"
            )


def non_finite(params: dict[str, torch.Tensor]) -> list[str]:
    """Names of floating-point (or complex) tensors holding NaN or infinity, in order."""
    bad = []
    for k, v in params.items():
        if v.is_floating_point() and v.element_size() == 1:
            v = v.float()  # torch has no isfinite for float8_e4m3fn
        if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all()):
            bad.append(k)
    return bad


def state_to_numpy(params: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in params.items()}
