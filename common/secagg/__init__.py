"""Secure aggregation (Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving Machine
Learning"; SecAgg+'s k-regular graph, Bell et al. 2020, as an option): the researcher learns only the sum of
the nodes' updates.

Pure pieces, no I/O: `shamir` (t-out-of-n shares of 32-byte secrets), `fixedpoint` (float tensors to integers
mod 2^64 with a stated error bound), `masking` (ChaCha20 PRG, pairwise and self masks), `keys` (x25519
agreement, AES-GCM for shares relayed through the researcher), `graph` (who masks with whom), `protocol` (the
node's and the researcher's state machines per round: keys -> shares -> masked input -> unmask).
"""

from .fixedpoint import FixedPoint
from .protocol import NodeSession, ResearcherSession, SecaggError

__all__ = ["FixedPoint", "NodeSession", "ResearcherSession", "SecaggError"]
