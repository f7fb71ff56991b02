"""The base of every protocol message (`messages.py` holds the catalogue): ids, blob references, signatures."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from fedsilo.common import PROTOCOL_VERSION

_ID = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$")]
_SHA = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


def new_id() -> str:
    return uuid.uuid4().hex


class BlobRef(BaseModel):
    """A file-store object: content-addressed, so its id is its sha256."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    sha256: _SHA
    size: int = Field(ge=0)


class Message(BaseModel):
    """Base of every message; NaN and infinities are refused in every float field (JSON has neither)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    protocol_version: int = PROTOCOL_VERSION
    request_id: _ID = Field(default_factory=new_id)
    sender: _ID
    timestamp: float = Field(default_factory=time.time)
    _signature: tuple[str, str] | None = PrivateAttr(None)
    """(signer, base64 signature) once `Messaging` verified the bytes this was parsed from; never sent."""

    def to_json(self) -> bytes:
        return self.model_dump_json().encode("utf-8")

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
