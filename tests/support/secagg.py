"""Key authorities of a small consortium for secure-aggregation tests: one Ed25519 key per party and a roster
the (test) authority signed, as `fedsilo network start` makes them."""

from __future__ import annotations

from fedsilo.common.signing import Roster, RosterEntry, generate_key, private_b64, public_b64
from fedsilo.node.secagg_auth import KeyAuthority


def authorities(roles: dict[str, str]) -> dict[str, KeyAuthority]:
    """party -> its KeyAuthority, for parties named with their roster role ("node", "researcher")."""
    authority = generate_key()
    keys = {name: generate_key() for name in roles}
    roster = Roster(version=1, parties={n: RosterEntry(role=roles[n], key=public_b64(k)) for n, k in keys.items()})
    wire = roster.sign(authority).decode()
    return {n: KeyAuthority(n, private_b64(k), public_b64(authority), wire, None) for n, k in keys.items()}
