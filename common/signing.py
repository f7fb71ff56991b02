"""Ed25519 signatures on the exact bytes of a message, and the consortium's signed roster of parties.

Canonical form: nothing is re-serialised. A party signs the JSON object it publishes, byte for byte,
and appends the signature as the object's last member:

    signed bytes  {"kind":"ping_request",...,"sender":"r1"}
    on the wire   {"kind":"ping_request",...,"sender":"r1","sig":"r1:<base64 of 64 bytes>"}

A receiver cuts the trailing `,"sig":"<signer>:<signature>"` member off (a regular expression over the
last 256 bytes only: bounded work whatever the payload), puts the `}` back, and verifies the signature
over those bytes with the signer's key; only the verified bytes are parsed. Any change to a byte of the
message, of the signer's name or of the signature fails verification.

The roster ({party: {role, key}}, a version and a time) travels in the same form, signed by the
consortium authority (signer `_authority`); a party trusts a signer only when a roster verified with the
authority's public key names it with the right role.

    authority = generate_key()
    alice = generate_key()
    roster = Roster(version=1, parties={"alice": RosterEntry(role="researcher", key=public_b64(alice))})
    trust = Trust(authority.public_key(), roster.sign(authority), accept={"researcher"})
    opened = trust.open(sign_json(b'{"sender":"alice"}', "alice", alice))
    assert opened.signer == "alice" and opened.body == b'{"sender":"alice"}'
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ErrorCode, FedsiloError
from .safejson import JSONLimitError, check_json

log = logging.getLogger(__name__)

AUTHORITY = "_authority"
"""The signer name of a roster: its key is the authority key from the credentials, never a roster entry."""
MAX_ROSTER_BYTES = 1 << 20
"""About 150 bytes a party: room for several thousand parties."""
_SIG_RE = re.compile(rb',"sig":"([A-Za-z0-9_.\-]{1,64}):([A-Za-z0-9+/]{86}==)"}\Z')
_TAIL = 256
"""The signature member is at most 6 + 64 + 1 + 88 + 2 bytes: the regex never looks further back."""


class SignatureError(FedsiloError):
    """A message is unsigned, badly signed, or signed by a party this one does not trust for it.

    `code` is what the receiver answers with (FS104 unsigned or bad, FS105 unknown signer, FS106 wrong role,
    FS102 signed by another party than the one that published it); `signer` the name it claims."""

    def __init__(self, code: ErrorCode, reason: str, signer: str = "") -> None:
        super().__init__(reason)
        self.code, self.reason, self.signer = code, reason, signer


# ------------------------------------------------------------------------------------------ keys
def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_b64(key: Ed25519PrivateKey) -> str:
    """The 32 raw private bytes, base64: what a credentials file's `signing_key` holds."""
    from cryptography.hazmat.primitives import serialization as s

    return base64.b64encode(key.private_bytes(s.Encoding.Raw, s.PrivateFormat.Raw, s.NoEncryption())).decode()


def public_b64(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The 32 raw public bytes, base64 (a roster entry's `key`, a credentials file's `authority_key`)."""
    from cryptography.hazmat.primitives import serialization as s

    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return base64.b64encode(pub.public_bytes(s.Encoding.Raw, s.PublicFormat.Raw)).decode()


def _raw32(text: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ValueError(f"{what} must be 32 bytes in base64")
    return raw


def private_from_b64(text: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(_raw32(text, "an Ed25519 private key"))


def public_from_b64(text: str) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(_raw32(text, "an Ed25519 public key"))


# ------------------------------------------------------------------------------------- envelope
def sign_json(payload: bytes, signer: str, key: Ed25519PrivateKey) -> bytes:
    """`payload` (a JSON object's bytes, as published) with `"sig":"<signer>:<signature>"` appended."""
    if len(payload) < 3 or payload[:1] != b"{" or payload[-1:] != b"}":
        raise ValueError("only a non-empty JSON object can be signed")
    signature = base64.b64encode(key.sign(payload))
    return payload[:-1] + b',"sig":"' + signer.encode() + b":" + signature + b'"}'


@dataclass(frozen=True)
class Signed:
    """What `split_signed` finds: the signed bytes, who claims to have signed them, and the signature."""

    body: bytes
    signer: str
    signature: bytes

    def verify(self, key: Ed25519PublicKey) -> bool:
        try:
            key.verify(self.signature, self.body)
        except InvalidSignature:
            return False
        return True

    @property
    def signature_b64(self) -> str:
        return base64.b64encode(self.signature).decode()


def split_signed(wire: bytes | bytearray) -> Signed:
    """Cut the trailing signature member off; `SignatureError` (FS104) when there is none."""
    raw = bytes(wire)
    tail_at = max(len(raw) - _TAIL, 0)
    m = _SIG_RE.search(raw, tail_at)
    if m is None:
        raise SignatureError(ErrorCode.SIGNATURE_INVALID, "unsigned: no signature member at the end of the message")
    body = raw[: m.start()] + b"}"
    return Signed(body, m.group(1).decode(), base64.b64decode(m.group(2)))


# --------------------------------------------------------------------------------------- roster
class RosterEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    role: Literal["node", "researcher", "admin"]
    key: str = Field(pattern=r"^[A-Za-z0-9+/]{43}=$")


class Roster(BaseModel):
    """The parties of a consortium and their signing keys; `version` only grows (a party keeps the newest)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    format_version: int = 1
    version: int = Field(ge=1)
    issued_at: float = Field(default_factory=time.time)
    parties: dict[str, RosterEntry]

    def sign(self, authority: Ed25519PrivateKey) -> bytes:
        return sign_json(self.model_dump_json().encode(), AUTHORITY, authority)

    @classmethod
    def verify(cls, wire: bytes | bytearray | str, authority: Ed25519PublicKey) -> Roster:
        """The roster in `wire` if the authority signed it; `SignatureError` otherwise."""
        raw = wire.encode() if isinstance(wire, str) else bytes(wire)
        if len(raw) > MAX_ROSTER_BYTES:
            raise SignatureError(ErrorCode.SIGNATURE_INVALID, f"roster over {MAX_ROSTER_BYTES} bytes")
        signed = split_signed(raw)
        if signed.signer != AUTHORITY or not signed.verify(authority):
            raise SignatureError(ErrorCode.SIGNATURE_INVALID, "roster not signed by the consortium authority")
        try:
            check_json(signed.body, max_bytes=MAX_ROSTER_BYTES, max_depth=4)
            return cls.model_validate_json(signed.body)
        except (JSONLimitError, ValidationError) as exc:
            raise SignatureError(ErrorCode.SIGNATURE_INVALID, f"roster unreadable: {exc}") from None


# ---------------------------------------------------------------------------------------- trust
@dataclass(frozen=True)
class Opened:
    """A verified message: the exact bytes signed, the signer and its role in the roster."""

    body: bytes
    signer: str
    role: str
    signature: str


class Trust:
    """What a party believes: the authority's key, the newest roster it verified, the roles it takes
    messages from (`accept`). With `store`, the newest roster is kept in that file across restarts.

        trust = Trust(authority_pub, roster_wire, accept={"researcher"}, store=Path("db/roster.signed"))
        opened = trust.open(payload)          # SignatureError unless a trusted party signed it
    """

    def __init__(
        self,
        authority: Ed25519PublicKey,
        roster: bytes | str | None,
        accept: Iterable[str],
        store: Path | None = None,
    ) -> None:
        self.authority = authority
        self.accept = frozenset(accept)
        self.store = store
        self._lock = threading.Lock()
        self.roster: Roster | None = None
        self._keys: dict[str, tuple[str, Ed25519PublicKey]] = {}
        for source, wire in (("credentials", roster), ("store", self._stored())):
            if wire:
                try:
                    self.offer_roster(wire, save=False)
                except SignatureError as exc:
                    log.warning("roster from %s ignored: %s", source, exc.reason)

    def _stored(self) -> bytes | None:
        if self.store is None:
            return None
        with contextlib.suppress(OSError):
            return self.store.read_bytes()
        return None

    @property
    def version(self) -> int:
        return self.roster.version if self.roster is not None else 0

    def offer_roster(self, wire: bytes | str, save: bool = True) -> bool:
        """Adopt `wire` if the authority signed it and it is newer; True when adopted. `SignatureError` when
        it is not the authority's (the caller logs and ignores it)."""
        roster = Roster.verify(wire, self.authority)
        with self._lock:
            if roster.version <= self.version:
                return False
            keys = {}
            for name, entry in roster.parties.items():
                with contextlib.suppress(ValueError):  # a malformed key: that party cannot be verified
                    keys[name] = (entry.role, public_from_b64(entry.key))
            self.roster, self._keys = roster, keys
        if save and self.store is not None:
            tmp = self.store.with_name(self.store.name + ".tmp")
            with contextlib.suppress(OSError):
                tmp.write_bytes(wire.encode() if isinstance(wire, str) else bytes(wire))
                os.replace(tmp, self.store)
        log.info("roster version %d adopted (%d parties)", roster.version, len(roster.parties))
        return True

    def knows(self, party: str) -> bool:
        with self._lock:
            return party in self._keys

    def open(self, wire: bytes | bytearray) -> Opened:
        """Verify `wire`; the signed bytes and signer, or `SignatureError` naming why not."""
        signed = split_signed(wire)
        with self._lock:
            found = self._keys.get(signed.signer)
        if found is None:
            raise SignatureError(ErrorCode.UNKNOWN_SIGNER, f"signer {signed.signer!r} is not in the roster "
                                 f"(version {self.version})", signed.signer)  # fmt: skip
        role, key = found
        if not signed.verify(key):
            raise SignatureError(ErrorCode.SIGNATURE_INVALID, f"bad signature for {signed.signer!r}", signed.signer)
        if role not in self.accept:
            raise SignatureError(ErrorCode.SIGNER_ROLE, f"signer {signed.signer!r} is a {role} in the roster; this "
                                 f"party takes messages from {', '.join(sorted(self.accept)) or 'no one'}",
                                 signed.signer)  # fmt: skip
        return Opened(signed.body, signed.signer, role, signed.signature_b64)


ROLES_HEARD: dict[str, frozenset[str]] = {
    "node": frozenset({"researcher"}),
    "researcher": frozenset({"node"}),
    "admin": frozenset(),
}
"""Whose messages a party of each role takes: nodes hear researchers, researchers hear nodes."""
