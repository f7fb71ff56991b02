"""The base of every protocol message (`messages.py` holds the catalogue): ids, blob references, signatures."""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from typing import Annotated, Any, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PrivateAttr,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from fedsilo.common import PROTOCOL_VERSION
from fedsilo.common.hashing import BLOB_DIGEST, DIGESTS, Algorithm, blob_key, digest_bytes

_ID = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$")]
_SHA = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


def new_id() -> str:
    return uuid.uuid4().hex


INLINE_BLOB_BYTES = 512 * 1024
"""The largest blob a message carries inline (`BlobRef.data`, raw bytes); a larger one goes through the file
store. The message limit (`messages.MAX_MESSAGE_BYTES`) is derived from it: base64 of this plus room for the rest.
512 KiB holds the benchmark's small model (50,552 float32 parameters, 202,400 bytes of safetensors) and its int64
masked update under secure aggregation (404,592 bytes). Not larger: inline bytes ride in every copy of a message
(each re-send, a persistent session's queue in the broker's memory) as 4/3 of their size and are parsed as one
JSON string, where a large blob is better streamed to the store once; a message stays under 1 MB. Inline costs
build + encode 0.5 / 1.3 ms and parse + check 1.0 / 2.5 ms for 200 KB / 512 KiB (2026-11-30, load 3), against
5-11 ms for a download and 11-25 ms for an upload of 200 KB.
Measured (2026-11-30 22:17-22:22, bench/inline_blobs.py, peerbench-v1 small, K node daemons as processes, A/B
alternating, two sittings each, load 1.9-4.0 with 0-5 % foreign CPU; medians of 8 rounds; s):

    | K, blobs via | round wall   | researcher prepare / handle | node load_params / upload | store CPU a round |
    | 3, store     | 0.132, 0.119 | 0.010 / 0.025               | 0.011 / 0.015             | 0.05-0.06, 4 blobs  |
    | 3, inline    | 0.107, 0.096 | 0.001 / 0.004               | 0.0003 / 0.0003           | 0, none             |
    | 10, store    | 0.408, 0.369 | 0.010 / 0.106               | 0.038-0.055 / 0.066-0.074 | 0.14-0.16, 11 blobs |
    | 10, inline   | 0.318, 0.329 | 0.001 / 0.021               | 0.0003 / 0.0002           | 0, none             |
"""


def b64_length(size: int) -> int:
    """Characters of the base64 of `size` bytes (padded, no newlines)."""
    return 4 * ((size + 2) // 3)


_B64_LAST = {2: "AQgw", 1: "AEIMQUYcgkosw048"}  # the digit before "==" or "=": its unused bits must be 0


def _from_base64(value: Any) -> Any:
    """Standard base64 (RFC 4648 section 4: A-Z a-z 0-9 + /, padded, no newline, no space, canonical) -> bytes;
    anything else is refused (`base64.b64decode` alone ignores stray characters, and every decoder accepts non-zero
    padding bits). A str longer than the base64 of `INLINE_BLOB_BYTES` is refused before it is decoded. Bytes given in
    Python (not JSON) are the data itself."""
    if not isinstance(value, str):
        return value
    if len(value) > b64_length(INLINE_BLOB_BYTES):
        raise ValueError(f"inline data over {INLINE_BLOB_BYTES} bytes (INLINE_BLOB_BYTES): send it through the "
                         "file store")  # fmt: skip
    try:  # strict mode: 4x faster than b64decode(validate=True), whose check is a regular expression (6 -> 1.6 ms
        data = binascii.a2b_base64(value, strict_mode=True)  # for 512 KiB, measured 2026-11-30, load 4.7)
    except ValueError as exc:  # binascii.Error, or a str that is not ASCII
        raise ValueError(f"inline data is not standard base64 ({exc})") from None
    pad = len(value) - len(value.rstrip("="))
    if pad and value[-pad - 1] not in _B64_LAST[pad]:
        raise ValueError("inline data is not canonical base64 (padding bits set)")
    return data


def _to_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


ATTACHED = b"\0"
"""In a message's wire form (`Message.to_wire`), what separates its JSON from the bytes of its inline blobs: JSON
text never holds a raw NUL, so the first one ends the JSON. Each inline ref then says where its bytes lie
(`{"sha256", "size", "at"}`); the signature covers the JSON, whose sha256 of each blob binds its bytes."""


class Attached:
    """The bytes after a message's JSON while it is parsed (validation context `attached`): each inline ref takes
    its `size` bytes at `at`, and together they may take no more bytes than there are, so a ref repeated a
    thousand times cannot make a 500 KB message into 500 MB of copies.

        attached = Attached(memoryview(tail))
        data = attached.take(0, 1024)           # bytes(tail[0:1024]); ValueError past the end or the total
        attached.taken == len(tail)             # every byte referenced (parse_message checks it)
    """

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.taken = 0

    def take(self, at: Any, size: Any) -> bytes:
        for name, value in (("at", at), ("size", size)):
            if type(value) is not int or value < 0:
                raise ValueError(f"an attached blob's {name!r} must be a non-negative integer")
        if size > INLINE_BLOB_BYTES:
            raise ValueError(f"an attached blob of {size} bytes is over INLINE_BLOB_BYTES ({INLINE_BLOB_BYTES})")
        if at + size > len(self.view) or self.taken + size > len(self.view):
            raise ValueError(f"an attached blob at {at} of {size} bytes is past the {len(self.view)} bytes attached "
                             "(or overlaps another)")  # fmt: skip
        self.taken += size
        return bytes(self.view[at : at + size])


class _Attacher:
    """Serialisation context `attach` (`Message.to_wire`): inline data goes after the JSON, its offset in the ref."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, data: bytes) -> int:
        at = self.size
        self.parts.append(data)
        self.size += len(data)
        return at


InlineData = Annotated[
    bytes, BeforeValidator(_from_base64), PlainSerializer(_to_base64, return_type=str, when_used="json")
]
"""Bytes in Python, standard base64 in JSON (`_from_base64`)."""


class BlobRef(BaseModel):
    """A blob by its digest and size: in the file store (content-addressed: its name, `key`, is its digest), or
    carried inline in the message (`data`, at most `INLINE_BLOB_BYTES`): small models and updates then move with
    the message, without a file-store round trip. The digest is a BLAKE3 (`blake3`, what new blobs are named by:
    `common.hashing.BLOB_DIGEST`) or a sha256 (`sha256`: plans, whose sha256 a data manager approves, and every
    blob named before BLAKE3); a ref has exactly one. `data` is checked once, when the ref is parsed or built: its
    length must be `size` and its digest the ref's, else the message is invalid (field `...data`).

        ref = BlobRef.inline(blob_bytes)          # hashed once here (BLAKE3)
        ref.data is not None                      # True: the receiver needs no download
        ref.lean()                                # the same ref without its data, to keep or record
        ref.key                                   # "blake3-<hex>": its name in the file store
        ref.model_dump_json()                     # {"blake3": ..., "size": ..., "data": "<base64>"}
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    sha256: _SHA | None = None
    blake3: _SHA | None = None
    size: int = Field(ge=0)
    data: InlineData | None = Field(None, repr=False)  # never in a repr: logs must not print a model
    """The blob itself, when it travels inline; None: fetch it from the file store."""

    @model_validator(mode="before")
    @classmethod
    def _attached(cls, value: Any, info: ValidationInfo) -> Any:
        """A ref of a message's wire form (`{"blake3", "size", "at"}`): its data from the bytes after the JSON."""
        if not isinstance(value, dict) or "at" not in value:
            return value
        attached = (info.context or {}).get("attached")
        if not isinstance(attached, Attached):
            raise ValueError("'at' names attached bytes, and this message has none")
        if value.get("data") is not None:
            raise ValueError("a blob ref carries its data inline or attached, not both")
        return {k: v for k, v in value.items() if k != "at"} | {"data": attached.take(value["at"], value.get("size"))}

    @field_validator("size")
    @classmethod
    def _one_digest(cls, size: int, info: ValidationInfo) -> int:
        """Exactly one digest (checked here, before `data`, which is hashed with it)."""
        named = [a for a in DIGESTS if info.data.get(a) is not None]
        if len(named) != 1:
            raise ValueError(f"a blob ref names its digest as exactly one of {', '.join(DIGESTS)}; it has "
                             f"{', '.join(named) or 'none'}")  # fmt: skip
        return size

    @field_validator("data")
    @classmethod
    def _matches(cls, data: bytes | None, info: ValidationInfo) -> bytes | None:
        if data is None:
            return None
        if len(data) > INLINE_BLOB_BYTES:
            raise ValueError(f"inline data of {len(data)} bytes is over {INLINE_BLOB_BYTES} (INLINE_BLOB_BYTES): "
                             "send it through the file store")  # fmt: skip
        size = info.data.get("size")
        named = [(a, info.data[a]) for a in DIGESTS if info.data.get(a) is not None]
        if size is None or len(named) != 1:  # already refused: the error names that field
            return data
        if len(data) != size:
            raise ValueError(f"inline data has {len(data)} bytes, the ref says size {size}")
        algorithm, expected = named[0]
        if digest_bytes(data, algorithm) != expected:
            raise ValueError(f"inline data does not hash to the ref's {algorithm} {expected}")
        return data

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> dict[str, Any]:
        """A ref without data dumps as `{<algorithm>: ..., "size": ...}`; `context={"inline": False}` leaves the
        data out (what a node or researcher keeps or records: `Message.to_json(inline=False)`)."""
        context = info.context or {}
        name = {self.algorithm: self.digest, "size": self.size}
        if self.data is not None and isinstance(context.get("attach"), _Attacher):
            return name | {"at": context["attach"].add(self.data)}
        if self.data is not None and context.get("inline", True):
            return name | {"data": _to_base64(self.data)} if info.mode_is_json() else name | {"data": self.data}
        return name

    @property
    def algorithm(self) -> Algorithm:
        """The digest this blob is named by: "blake3" or "sha256"."""
        return "sha256" if self.sha256 is not None else "blake3"

    @property
    def digest(self) -> str:
        """The blob's digest (64 hex characters) under `algorithm`."""
        return self.sha256 if self.sha256 is not None else self.blake3  # type: ignore[return-value]

    @property
    def key(self) -> str:
        """The blob's name in the file store (`common.hashing.blob_key`): a sha256, or `blake3-` and a BLAKE3."""
        return blob_key(self.algorithm, self.digest)

    @classmethod
    def named(cls, algorithm: Algorithm, digest: str, size: int) -> BlobRef:
        """A ref without data, validated: `BlobRef.named("blake3", hexdigest, 40_000_000)`."""
        return cls.model_validate({algorithm: digest, "size": size})

    @classmethod
    def inline(cls, data: bytes | bytearray | memoryview, algorithm: Algorithm = BLOB_DIGEST) -> BlobRef:
        """A ref carrying `data`, hashed once here (nothing to check: the ref is made from the data)."""
        raw = bytes(data)
        if len(raw) > INLINE_BLOB_BYTES:
            raise ValueError(f"{len(raw)} bytes is over INLINE_BLOB_BYTES ({INLINE_BLOB_BYTES})")
        return cls.model_construct(**{algorithm: digest_bytes(raw, algorithm)}, size=len(raw), data=raw)

    def lean(self) -> BlobRef:
        """This ref without its data (itself when it has none)."""
        if self.data is None:
            return self
        return self.model_construct(**{self.algorithm: self.digest}, size=self.size, data=None)


def inline_bytes(obj: Any) -> int:
    """The bytes carried inline by the blob refs in `obj` (a message, a ref, or dicts and lists of them)."""
    if isinstance(obj, BlobRef):
        return len(obj.data) if obj.data is not None else 0
    if isinstance(obj, BaseModel):
        obj = obj.__dict__
    if isinstance(obj, dict):
        return sum(inline_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(inline_bytes(v) for v in obj)
    return 0


class Message(BaseModel):
    """Base of every message; NaN and infinities are refused in every float field (JSON has neither)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    protocol_version: int = PROTOCOL_VERSION
    request_id: _ID = Field(default_factory=new_id)
    sender: _ID
    timestamp: float = Field(default_factory=time.time)
    _signature: tuple[str, str] | None = PrivateAttr(None)
    """(signer, base64 signature) once `Messaging` verified the bytes this was parsed from; never sent."""

    def to_json(self, inline: bool = True) -> bytes:
        """The wire form; `inline=False` leaves out the data of inline blobs (`BlobRef.data`): the form to
        keep, record or hand on once the data was used."""
        return self.model_dump_json(context=None if inline else {"inline": False}).encode("utf-8")

    def to_wire(self) -> bytes:
        """What is published: the JSON, and when inline blobs ride along, `ATTACHED` and their raw bytes (each ref
        says where its own lie). Measured (2026-12-01, K=10 small, `perf` of the researcher): base64 in and out
        and the Ed25519 signatures' SHA-512 over the base64 of every request and reply were a third of the
        researcher's CPU; the JSON alone is now signed, and the blob's sha256 in it binds its bytes."""
        attach = _Attacher()
        head = self.model_dump_json(context={"attach": attach}).encode("utf-8")
        return b"".join([head, ATTACHED, *attach.parts]) if attach.parts else head

    @property
    def signer(self) -> str:
        """The party whose signature on this message was verified ("" when none was: an unsigned channel)."""
        return self._signature[0] if self._signature else ""

    @property
    def signature(self) -> str:
        return self._signature[1] if self._signature else ""


class Reply(Message):
    """Base of every answer; build one with `for_request`, which sets who answers and to what."""

    node_id: _ID
    node_name: str = ""
    in_reply_to: _ID

    @classmethod
    def for_request(cls, request: Message | str, node_id: str, node_name: str = "", **fields: Any) -> Self:
        """A reply of this kind to `request` (or to a request id), from `node_id`.

            TaskAck.for_request(req, "hospital-a", job_id=req.job_id, round=req.round)
        """
        rid = request if isinstance(request, str) else request.request_id
        return cls(sender=node_id, node_id=node_id, node_name=node_name, in_reply_to=rid, **fields)
