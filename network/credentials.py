"""How a party reaches the network: broker and file-store addresses plus its own secrets.

`fedsilo network start` writes one credentials file per party under `NETWORK_DIR/credentials/`;
`fedsilo node init` copies a node's file into the node directory and `Experiment` reads the
researcher's. Files are JSON, mode 0600.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedsilo.common.config import validate
from fedsilo.common.errors import ConfigError


class TlsSettings(BaseModel):
    """A party's TLS material as PEM text (`network/pki.py` makes it): the consortium CA it trusts, and its
    own certificate and key (presented when the network asks for mutual TLS).

        tls = TlsSettings(ca=ca_pem, cert=cert_pem, key=key_pem); ctx = pki.client_context(tls)
    """

    model_config = ConfigDict(extra="forbid")
    ca: str
    cert: str | None = None
    key: str | None = None


class MqttSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    username: str
    password: str
    tls_ca: str | None = None
    """CA certificate path; when set, the connection uses TLS and verifies the broker."""
    keepalive: int = Field(15, ge=5, le=600)
    tls: TlsSettings | None = Field(None, exclude=True)
    """`Credentials.tls`, copied here on load (not saved twice): `Messaging` gets these settings only."""


class FileStoreSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str
    token: str
    ca: str | None = None
    tls: TlsSettings | None = Field(None, exclude=True)
    """`Credentials.tls`, copied here on load: `FileStoreClient` gets these settings only."""


class Credentials(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format_version: int = 1
    party: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    role: Literal["node", "researcher", "admin"]
    signing_key: str | None = None
    """This party's Ed25519 private key (base64 of 32 bytes): it signs every message the party publishes."""
    authority_key: str | None = None
    """The consortium authority's Ed25519 public key: the roster it signed says whose signatures to trust."""
    roster: str | None = None
    """The authority-signed roster as it was when these credentials were made (`common/signing.py`); newer
    ones arrive retained on `topics.ROSTER`."""
    mqtt: MqttSettings
    filestore: FileStoreSettings
    tls: TlsSettings | None = None
    """The broker and the file store speak TLS with this CA (and this certificate for mutual TLS)."""

    @model_validator(mode="after")
    def _share_tls(self) -> Credentials:
        if self.tls is not None:
            self.mqtt.tls = self.filestore.tls = self.tls
        return self

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(self.model_dump_json(indent=2))
        return p

    @classmethod
    def load(cls, path: str | Path) -> Credentials:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: credentials file not found (run `fedsilo network start` first?)")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ConfigError(f"{p}: not valid JSON ({exc})") from None
        return validate(cls, data, str(p))
