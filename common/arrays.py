"""Model parameters as numpy arrays: the one safetensors parser and writer. This module imports no torch.

The node's daemon parses, checks, clips, compresses and masks updates with it (`node/protection.py`,
`node/compression.py`, `node/secagg.py`) and never imports torch, which costs 147 MiB of private memory in
each process; `serialization.py` wraps the same parser and writer for torch (`torch.from_numpy`: no copy).

A payload is accepted only when its header parses as a bounded safetensors header whose tensor entries
exactly tile the data area (`parse_header`); pickles, torch.save zip archives and junk fail that parse, so
no byte is sniffed. (Sniffing the first byte refused fedsilo's own payloads: the 8-byte little-endian
header length starts with 0x80 whenever it is 128 modulo 256, for example for `nn.Linear(784, 10)`.)

Measured (bench/daemon_memory.py, K=3 small, after 2 rounds, shared 2-core machine at load 2-4, 2026-11-30): a
daemon's PSS 173.5 -> 51.4 MiB and USS 167.3 -> 50.4 MiB with its round stages on numpy; its modules alone
(daemon, runner and every round stage imported) 197 -> 38 MiB PSS. That is what lets K = 50 nodes share a machine.

numpy has no bfloat16 or float8: `ml_dtypes` gives them numpy dtypes, so that every array says what it
holds and `astype`, `isfinite` and arithmetic work on it as on float16 (its conversions round as torch's do;
`narrow` saturates float8_e4m3fn as torch does, where ml_dtypes would give NaN). It costs 2 MiB of private
memory; uint16/uint8 views would have needed every stage to carry the dtype beside each array.

    arrays = arrays_from_bytes(data, copy=False)     # {name: np.ndarray}, views into `data` when writable
    blob = arrays_to_buffers(arrays)                 # SerializedParams: header + the arrays' own memory
    blob.tobytes() == bytes(data)
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from .errors import SerializationError
from .hashing import Algorithm, new_digest
from .safejson import JSONLimitError, check_json

MAX_HEADER_BYTES = 16 << 20
"""A header entry is about 100 bytes: 16 MiB is room for 150,000 tensors (a ResNet-152 has 900)."""
MAX_DIMS = 64
"""numpy's limit on an array's dimensions (torch's is higher; no model comes near either)."""
MAX_EXTENT = 1 << 60
"""The most bytes the non-zero dimensions of a tensor may describe: an empty tensor of shape [0, 2**62] spans
0 bytes and tiles any payload, and numpy (torch too) cannot even allocate its header: refused here instead."""

DTYPES: dict[str, np.dtype] = {code: np.dtype(t).newbyteorder("<") for code, t in {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "C64": np.complex64,
}.items()}  # fmt: skip
"""safetensors' dtype names and the numpy dtype of each (the ones torch serialises: `serialization.py`)."""
CODES = {dtype: code for code, dtype in DTYPES.items()}
FLOATS = frozenset(DTYPES[c] for c in ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"))
"""Real floating-point dtypes: those a model trains, and the ones the update's checks and DP look at."""
_FINITE_SUM = frozenset(DTYPES[c] for c in ("F64", "F32", "C64"))
"""Dtypes whose own sum is a cheap finiteness test (`non_finite`); narrower ones overflow it too soon."""
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}
_METADATA = "__metadata__"
_WRITE_ORDER = ["U64", "I64", "F64", "C64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16",
                "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL"]  # fmt: skip
"""The safetensors writer's order (widest dtype first, then by name): every tensor's data starts aligned
to its item size, and the bytes equal `safetensors.torch.save`'s, so content hashes did not change."""
SEND_BLOCK = 16 << 20
"""Largest memoryview handed to a socket at once (`SerializedParams.__iter__`): ssl's write takes an int
length, and one 16 MiB send costs no more per byte than a whole tensor (1 MiB blocks: the same MB/s)."""

Arrays = Mapping[str, np.ndarray]


class SerializedParams:
    """A safetensors payload as buffers: an 8-byte length, the JSON header, then each array's own memory,
    never copied (the arrays, and the tensors they may view, are kept alive here). Hashed once, on first use.

        blob = params_to_buffers(model.state_dict())   # or arrays_to_buffers({name: ndarray})
        blob.size, blob.digest("blake3")  # the bytes a store receives and their hash
        files.upload_bytes(blob)        # sent straight from tensor memory (FileStoreClient)
        blob.tobytes() == params_to_bytes(model.state_dict())

    The arrays must not change while it is in use: the payload *is* their memory.
    """

    def __init__(self, head: bytes, arrays: list[np.ndarray]) -> None:
        self._arrays = arrays
        self.buffers: list[memoryview] = [memoryview(head)] + [raw_view(a) for a in arrays]
        self.size = sum(b.nbytes for b in self.buffers)
        self._digests: dict[str, str] = {}

    def digest(self, algorithm: Algorithm = "sha256") -> str:
        """The payload's digest (hex), computed on first use of each algorithm."""
        if algorithm not in self._digests:
            h = new_digest(algorithm)
            for buf in self.buffers:
                h.update(buf)  # hashlib and blake3 release the GIL over large buffers
            self._digests[algorithm] = h.hexdigest()
        return self._digests[algorithm]

    def tobytes(self) -> bytes:
        return b"".join(self.buffers)  # one copy

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[memoryview]:
        """The payload in order, in views of at most `SEND_BLOCK` bytes (an HTTP body without a copy)."""
        for buf in self.buffers:
            for start in range(0, buf.nbytes, SEND_BLOCK):
                yield buf[start : start + SEND_BLOCK]


def raw_view(array: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array, without a copy."""
    if array.size == 0:
        return memoryview(b"")
    return memoryview(array.reshape(-1).view(np.uint8))


def arrays_to_buffers(arrays: Arrays, metadata: dict[str, str] | None = None) -> SerializedParams:
    """Serialise named arrays to safetensors without copying their data (a non-contiguous one is copied)."""
    if sys.byteorder != "little":  # safetensors is little-endian; the raw memory would be wrong
        raise SerializationError("safetensors payloads are written on little-endian machines only")
    contiguous = {}
    for name, value in arrays.items():
        if not isinstance(value, np.ndarray) or value.dtype not in CODES:
            raise SerializationError(f"parameter '{name}' is not an array of a safetensors dtype")
        contiguous[name] = value if value.flags.c_contiguous else value.copy(order="C")
    order = sorted(contiguous, key=lambda n: (_WRITE_ORDER.index(CODES[contiguous[n].dtype]), n))
    header: dict[str, Any] = {_METADATA: metadata} if metadata else {}
    offset = 0
    for name in order:
        end = offset + contiguous[name].nbytes
        header[name] = {"dtype": CODES[contiguous[name].dtype], "shape": list(contiguous[name].shape),
                        "data_offsets": [offset, end]}  # fmt: skip
        offset = end
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data area starts 8-byte aligned
    return SerializedParams(len(text).to_bytes(8, "little") + text, [contiguous[n] for n in order])


def arrays_to_bytes(arrays: Arrays, metadata: dict[str, str] | None = None) -> bytes:
    """Serialise named arrays to safetensors bytes."""
    return arrays_to_buffers(arrays, metadata).tobytes()


def arrays_from_bytes(data: bytes | bytearray | memoryview, copy: bool = True) -> dict[str, np.ndarray]:
    """Parse safetensors bytes; anything else (pickle, torch.save archives, junk) is refused unread.

    With `copy=False` and a writable buffer (a `bytearray` just downloaded, that the caller hands over), the
    arrays are views into it, aligned ones at least: no copy. Otherwise each array gets its own memory, so
    every array returned is writable. Measured (40 MB, load 10): `safetensors.torch.load` 0.23 s, one copy
    per tensor 0.13 s, views 0 s.
    """
    header = parse_header(data)
    view = memoryview(data).cast("B")
    start = 8 + int.from_bytes(view[:8], "little")
    shared = not copy and not view.readonly and view.nbytes > 0
    whole = np.frombuffer(view, dtype=np.uint8) if view.nbytes else np.zeros(0, np.uint8)
    base = whole.ctypes.data if shared else 0  # a slice may start anywhere
    out = {}
    for name, entry in header.items():
        dtype = DTYPES[entry["dtype"]]
        begin, end = (start + o for o in entry["data_offsets"])
        if shared and begin < end and (base + begin) % dtype.itemsize == 0:  # aligned in memory: a view
            out[name] = whole[begin:end].view(dtype).reshape(entry["shape"])
        else:
            array = np.empty(entry["shape"], dtype=dtype)
            if begin < end:
                raw_view(array)[:] = view[begin:end]  # one copy
            out[name] = array
    return out


def parse_header(data: bytes | bytearray | memoryview) -> dict[str, dict[str, Any]]:
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
    dtype = DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise SerializationError(f"refused: tensor '{name}' has unsupported dtype {entry['dtype']!r}")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise SerializationError(f"refused: tensor '{name}' shape must be a list of non-negative integers")
    if len(shape) > MAX_DIMS or math.prod(d for d in shape if d) * dtype.itemsize > MAX_EXTENT:
        raise SerializationError(f"refused: tensor '{name}' shape has {len(shape)} dimensions describing "
                                 f"{math.prod(d for d in shape if d) * dtype.itemsize} bytes (at most {MAX_DIMS}, "
                                 f"{MAX_EXTENT})")  # fmt: skip
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


def blob_metadata(data: bytes | bytearray | memoryview) -> dict[str, str]:
    """The `__metadata__` of a safetensors payload that `arrays_from_bytes` already accepted (so its header's
    length, size and depth are within bounds)."""
    length = int.from_bytes(bytes(data[:8]), "little")
    try:
        header: Any = json.loads(bytes(data[8 : 8 + length]).decode("utf-8"))
    except ValueError as exc:
        raise SerializationError(f"refused: safetensors header is not JSON ({exc})") from None
    metadata = header.get(_METADATA) if isinstance(header, dict) else None
    return dict(metadata) if isinstance(metadata, dict) else {}


# ------------------------------------------------------------------------------------ checks and dtypes
def is_float(array: np.ndarray) -> bool:
    """A real floating-point array (bfloat16 and float8 included; complex is not)."""
    return array.dtype in FLOATS


def dtype_name(dtype: np.dtype) -> str:
    """torch's name for a safetensors dtype ("float32", "bfloat16", "float8_e4m3fn"), for messages."""
    return {"F8_E4M3": "float8_e4m3fn"}.get(CODES.get(dtype, ""), str(dtype))


Layout = dict[str, tuple[tuple[int, ...], str]]
"""Parameter name -> (shape, dtype as a message names it): what `check_layout` compares."""


def check_layout(received: Layout, reference: Layout) -> None:
    """Raise if received parameters do not match the model's names, shapes and dtypes (the one check behind the
    numpy `check_compatible` here and the torch one in `serialization.py`)."""
    missing = reference.keys() - received.keys()
    extra = received.keys() - reference.keys()
    if missing or extra:
        raise SerializationError(
            f"parameter names differ from the model: missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}"
        )
    for k, (ref_shape, ref_dtype) in reference.items():
        shape, dtype = received[k]
        if shape != ref_shape or dtype != ref_dtype:
            raise SerializationError(f"parameter '{k}': got {shape} {dtype}, model has {ref_shape} {ref_dtype}")


def check_compatible(received: Arrays, reference: Arrays) -> None:
    """Raise if received arrays do not match the model's names, shapes and dtypes."""
    check_layout({k: (a.shape, dtype_name(a.dtype)) for k, a in received.items()},
                 {k: (a.shape, dtype_name(a.dtype)) for k, a in reference.items()})  # fmt: skip


def non_finite(arrays: Arrays) -> list[str]:
    """Names of floating-point (or complex) arrays holding NaN or infinity, in order.

    An array whose sum is finite holds neither (IEEE: NaN and infinity propagate through addition, and
    inf + -inf is NaN), so the exact element-wise check runs only when the sum is not finite, which a large
    but finite array can also reach. Narrower floats are summed in float32 (their own sum overflows at 65504
    for float16). Measured (10 M float32, idle 2-core machine, 2026-11-30): `isfinite(a).all()` 47 ms (it
    writes a 10 M-entry mask), the sum 3 ms."""
    bad = []
    for k, v in arrays.items():
        if not (v.dtype in FLOATS or v.dtype.kind == "c") or v.size == 0:
            continue
        with np.errstate(over="ignore", invalid="ignore"):  # an overflowing sum only sends it to the exact check
            total = v.sum() if v.dtype in _FINITE_SUM else np.add.reduce(v, axis=None, dtype=np.float32)
        if np.isfinite(total):
            continue
        if not np.isfinite(v).all():
            bad.append(k)
    return bad


def widen(array: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """A float array as float32 (or `dtype`): a new array (the caller may change it in place)."""
    return array.astype(dtype, copy=True)


def narrow(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float32/float64 `values` in `dtype`, rounded as torch's `.to(dtype)` rounds (to nearest, ties to even;
    float8_e4m3fn, which has no infinity, saturates at +-448 as torch's does, where ml_dtypes gives NaN)."""
    if dtype == DTYPES["F8_E4M3"]:
        peak = float(ml_dtypes.finfo(dtype).max)
        values = np.clip(values, -peak, peak)  # NaN stays NaN
    if dtype.itemsize < 4 and values.dtype == np.float64:
        values = values.astype(np.float32)  # torch rounds double -> float -> half, bfloat16, float8; so does this
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is infinity, as in torch
        return np.asarray(values.astype(dtype))  # np.clip made a 0-d array a scalar
