"""Authenticated secure-aggregation keys: each node signs its round's x25519 public keys with its Ed25519 key
(the one the consortium roster names), and checks every other node's signature before it encrypts a share to
that key. Without this, the researcher, who relays the keys, could hand a node keys of its own making and read
the shares meant for the others (Bonawitz et al.'s active-adversary setting signs the keys for this reason).

The signed statement is a JSON object naming the researcher, job, round, node and both keys, so a signature
made for one round or researcher cannot be replayed in another:

    auth = KeyAuthority.of(creds, roster_store)
    sig = auth.sign(statement("r1", "job", 0, "hospital-a", c_pk, s_pk))
    auth.verify("hospital-a", statement(...), sig)      # SecaggError unless hospital-a signed exactly that
"""

from __future__ import annotations

import json
from pathlib import Path

from fedsilo.common.secagg import SecaggError
from fedsilo.common.signing import SignatureError, Trust, private_from_b64, public_from_b64, sign_json, split_signed
from fedsilo.network.credentials import Credentials


def statement(researcher: str, job_id: str, round_index: int, node: str, c: bytes, s: bytes) -> bytes:
    """The canonical bytes a node signs for its keys of one round."""
    body = {"secagg_keys": {"researcher": researcher, "job_id": job_id, "round": round_index, "node": node,
                            "c": c.hex(), "s": s.hex()}}  # fmt: skip
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def survivors_statement(researcher: str, job_id: str, round_index: int, survivors: list[str]) -> bytes:
    """The canonical bytes a survivor signs to vouch for the round's survivor list."""
    body = {"secagg_survivors": {"researcher": researcher, "job_id": job_id, "round": round_index,
                                 "survivors": sorted(set(survivors))}}  # fmt: skip
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


class KeyAuthority:
    """Signs this node's statements and verifies other nodes' against the consortium roster (role `node`).

        KeyAuthority.of(creds, nodedir / "db" / "roster.signed")
    """

    def __init__(self, party: str, signing_key: str, authority_key: str, roster: str | None, store: Path | None):
        self.party = party
        self._key = private_from_b64(signing_key)
        self._authority = public_from_b64(authority_key)
        self._roster, self._store = roster, store

    @classmethod
    def of(cls, creds: Credentials, store: Path | None = None) -> KeyAuthority | None:
        """None for credentials without signing keys (then keys are relayed unauthenticated, and said so)."""
        if not creds.signing_key or not creds.authority_key:
            return None
        return cls(creds.party, creds.signing_key, creds.authority_key, creds.roster, store)

    def sign(self, body: bytes) -> str:
        """The base64 signature of `body` by this node."""
        return split_signed(sign_json(body, self.party, self._key)).signature_b64

    def verify(self, node: str, body: bytes, signature: str) -> None:
        """`SecaggError` unless `node`, a node of the newest roster this node holds, signed `body`."""
        # The daemon's connection keeps the newest roster in `store`; read per share stage (a few ms), so a node
        # added to the consortium since this daemon started is known.
        trust = Trust(self._authority, self._roster, accept={"node"}, store=self._store)
        wire = body[:-1] + b',"sig":"' + node.encode() + b":" + signature.encode() + b'"}'
        try:
            opened = trust.open(wire)
        except SignatureError as exc:
            raise SecaggError(f"the keys given for '{node}' are not signed by it: {exc.reason}") from None
        if opened.signer != node:
            raise SecaggError(f"the keys given for '{node}' are signed by '{opened.signer}'")

    def valid(self, node: str, body: bytes, signature: str) -> bool:
        """Whether `node` signed `body` (a bad signature is not an error here: it is not counted)."""
        try:
            self.verify(node, body, signature)
        except SecaggError:
            return False
        return True
