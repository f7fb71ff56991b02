"""WireGuard keys: Curve25519 (X25519) key pairs and preshared keys, base64 as `wg genkey` writes them.

`cryptography`'s X25519 clamps the scalar exactly as WireGuard does, so `wg pubkey` of our private key
gives our public key (checked by tests/unit/test_vpn.py against Debian's wireguard-tools).
"""

from __future__ import annotations

import base64
import binascii
import secrets
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

KEY_BYTES = 32


@dataclass(frozen=True)
class KeyPair:
    """A WireGuard key pair in base64.

        pair = generate_keypair()
        assert public_key_of(pair.private) == pair.public
    """

    private: str
    public: str


def _raw(key: str) -> bytes:
    try:
        raw = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not a WireGuard key: invalid base64") from None
    if len(raw) != KEY_BYTES:
        raise ValueError(f"not a WireGuard key: {len(raw)} bytes instead of {KEY_BYTES}")
    return raw


def public_key_of(private: str) -> str:
    """The public key of a base64 private key (what `wg pubkey` prints)."""
    key = X25519PrivateKey.from_private_bytes(_raw(private))
    return base64.b64encode(key.public_key().public_bytes_raw()).decode()


def generate_keypair() -> KeyPair:
    private = base64.b64encode(X25519PrivateKey.generate().private_bytes_raw()).decode()
    return KeyPair(private=private, public=public_key_of(private))


def generate_preshared_key() -> str:
    """A symmetric key mixed into the handshake (post-quantum hedge, as `wg genpsk`)."""
    return base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()


def check_key(key: str) -> str:
    """The key if it is 32 bytes of base64, else ValueError."""
    _raw(key)
    return key
