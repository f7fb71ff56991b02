"""Per-party tokens: `Authorization: Token <token>`, checked by sha256 against parties.json."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings
from rest_framework import authentication, exceptions


@dataclass(frozen=True)
class Party:
    """The authenticated caller (DRF's `request.user`)."""

    name: str
    role: str
    is_authenticated: bool = True


class _TokenIndex:
    """token_sha256 -> Party, rebuilt when parties.json changes (cheap stat per request)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple[int, int, int] | None = None
        self._index: dict[str, Party] = {}

    def lookup(self, path: Path, token_hash: str) -> Party | None:
        return self._current(path).get(token_hash)

    def names(self, path: Path) -> set[str]:
        """The registered parties' names (readers named in a grant must be among them)."""
        return {p.name for p in self._current(path).values()}

    def _current(self, path: Path) -> dict[str, Party]:
        try:
            st = os.stat(path)
        except OSError:
            return {}
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key != self._key:
            with self._lock:
                if key != self._key:
                    self._index = self._read(path)
                    self._key = key
        return self._index

    @staticmethod
    def _read(path: Path) -> dict[str, Party]:
        with open(path, encoding="utf-8") as f:
            parties: dict[str, Any] = json.load(f).get("parties", {})
        return {p["token_sha256"]: Party(name, p["role"]) for name, p in parties.items()}


_index = _TokenIndex()


def party_names() -> set[str]:
    return _index.names(settings.FEDSILO_FILESTORE["parties"])


def party_for(header: str) -> Party | None:
    """The party an `Authorization: Token <token>` header names, or None (no header, another scheme, a token
    no party holds)."""
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme != PartyTokenAuthentication.keyword or not token:
        return None
    return _index.lookup(settings.FEDSILO_FILESTORE["parties"], hashlib.sha256(token.encode()).hexdigest())


class PartyTokenAuthentication(authentication.BaseAuthentication):
    keyword = "Token"

    def authenticate(self, request: Any) -> tuple[Party, str] | None:
        header = request.META.get("HTTP_AUTHORIZATION", "")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme != self.keyword or not token:
            raise exceptions.AuthenticationFailed("malformed Authorization header; expected 'Token <token>'")
        party = _index.lookup(settings.FEDSILO_FILESTORE["parties"], hashlib.sha256(token.encode()).hexdigest())
        if party is None:
            raise exceptions.AuthenticationFailed("invalid token; use the token from your credentials file")
        return party, token

    def authenticate_header(self, request: Any) -> str:
        return self.keyword  # makes DRF answer 401 (not 403) and name the scheme
