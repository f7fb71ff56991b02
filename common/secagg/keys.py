"""x25519 key agreement and AES-GCM for the shares the researcher relays between nodes.

Every node makes two key pairs per round, as in Bonawitz et al.: `c` encrypts the shares it sends to its
neighbours (through the researcher, who cannot read them), `s` derives the pairwise masks. A shared secret goes
through HKDF-SHA256 with a label that names its use and the round, so a key never serves two purposes or rounds.

    a, b = KeyPair.generate(), KeyPair.generate()
    k = a.agree(b.public, b"fedsilo-secagg/shares|job|0")
    assert k == b.agree(a.public, b"fedsilo-secagg/shares|job|0")
    box = seal(k, b"hello", aad=b"a->b")
    assert open_sealed(k, box, aad=b"a->b") == b"hello"
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import SecaggError

KEY_BYTES = 32
NONCE_BYTES = 12


@dataclass(frozen=True)
class KeyPair:
    """An x25519 key pair; `private` is the raw 32 bytes (what a node secret-shares for recovery)."""

    private: bytes
    public: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        return cls.from_private(X25519PrivateKey.generate().private_bytes_raw())

    @classmethod
    def from_private(cls, private: bytes) -> KeyPair:
        if len(private) != KEY_BYTES:
            raise SecaggError("an x25519 private key is 32 bytes")
        key = X25519PrivateKey.from_private_bytes(private)
        public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return cls(private, public)

    def agree(self, peer_public: bytes, label: bytes) -> bytes:
        """A 32-byte key both ends derive: HKDF-SHA256 over the x25519 shared secret, `label` as info."""
        try:
            shared = X25519PrivateKey.from_private_bytes(self.private).exchange(
                X25519PublicKey.from_public_bytes(peer_public))  # fmt: skip
        except ValueError as exc:  # a wrong length, or a low-order point (all-zero shared secret)
            raise SecaggError(f"unusable public key: {exc}") from None
        return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=label).derive(shared)


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM with a random nonce: nonce || ciphertext || tag; `aad` binds sender, recipient and round."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, box: bytes, aad: bytes) -> bytes:
    """The plaintext of `seal`; `SecaggError` when the box was altered or made for another pair or round."""
    if len(box) < NONCE_BYTES + 16:
        raise SecaggError("encrypted share too short")
    try:
        return AESGCM(key).decrypt(box[:NONCE_BYTES], box[NONCE_BYTES:], aad)
    except InvalidTag:
        raise SecaggError("encrypted share failed authentication (altered, or not addressed to this node)") from None
