"""Signed secure-aggregation keys (node/secagg_auth.py): a node accepts another node's keys only when that node
signed exactly them, for this researcher, job and round, with the key the consortium's roster gives it."""

from __future__ import annotations

import pytest

from fedsilo.common.secagg import SecaggError
from fedsilo.node.secagg_auth import KeyAuthority, statement
from tests.support.secagg import authorities

C, S = bytes(range(32)), bytes(range(1, 33))


@pytest.fixture(scope="module")
def parties() -> dict[str, KeyAuthority]:
    return authorities({"hospital-a": "node", "hospital-b": "node", "r1": "researcher"})


def test_a_node_accepts_keys_its_peer_signed(parties: dict[str, KeyAuthority]) -> None:
    body = statement("r1", "job", 0, "hospital-a", C, S)
    parties["hospital-b"].verify("hospital-a", body, parties["hospital-a"].sign(body))


@pytest.mark.parametrize(
    ("signer", "claimed", "body", "why"),
    [
        ("hospital-a", "hospital-a", statement("r1", "job", 0, "hospital-a", S, C), "not signed by it"),  # swapped
        ("hospital-a", "hospital-a", statement("r1", "job", 1, "hospital-a", C, S), "not signed by it"),  # round
        ("hospital-a", "hospital-a", statement("r2", "job", 0, "hospital-a", C, S), "not signed by it"),  # researcher
        ("hospital-b", "hospital-a", statement("r1", "job", 0, "hospital-a", C, S), "not signed by it"),  # other node
        ("r1", "r1", statement("r1", "job", 0, "r1", C, S), "researcher"),  # the researcher signing as a party
    ],
)
def test_keys_not_signed_by_their_node_are_refused(parties, signer, claimed, body, why) -> None:
    signed = statement("r1", "job", 0, "hospital-a", C, S) if signer.startswith("hospital") else body
    signature = parties[signer].sign(signed)
    with pytest.raises(SecaggError, match=why):
        parties["hospital-b"].verify(claimed, body, signature)


def test_an_unknown_node_is_refused(parties: dict[str, KeyAuthority]) -> None:
    body = statement("r1", "job", 0, "hospital-z", C, S)
    with pytest.raises(SecaggError, match="not in the roster"):
        parties["hospital-b"].verify("hospital-z", body, parties["hospital-a"].sign(body))
