"""WireGuard configurations for a fedsilo consortium: a hub on the network host, one peer per party.

The broker and the file store then listen on the hub's tunnel address only, so nothing of fedsilo is
reachable from the open internet (TLS and signatures still apply inside the tunnel). See `vpn/README.md`.
"""

from .keys import KeyPair, generate_keypair, public_key_of
from .registry import VpnError, VpnRegistry

__all__ = ["KeyPair", "VpnError", "VpnRegistry", "generate_keypair", "public_key_of"]
