"""The per-round state machines of secure aggregation: `NodeSession` (one per node and round) and
`ResearcherSession` (the researcher's view of the round). Stages, as in Bonawitz et al. and Flower's SecAgg+
workflow: setup (the parties and settings) -> keys (each node's two public keys) -> shares (each node
secret-shares its self-mask seed b_u and its mask key s_u to its neighbours, encrypted to each, relayed by the
researcher) -> masked input (the update, encoded and masked) -> unmask (the survivors' b shares, the dropped
nodes' s shares).

A node answers each stage once per round, in order, and never reveals both the b share and the s share of the
same node: that is what keeps a single masked input secret even from a researcher that asks twice.

    node = NodeSession("a", "job", 0, ["a", "b", "c"], SecaggConfig(threshold=2))
    c_pk, s_pk = node.public_keys()
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence

import numpy as np

from . import shamir
from .config import SecaggConfig
from .errors import SecaggError
from .graph import neighbours
from .keys import KeyPair, open_sealed, seal
from .masking import add_signed, apply_masks, pairwise_sign, prg

PublicKeys = tuple[bytes, bytes]
"""(c: the share-encryption key, s: the mask key), raw x25519 public keys."""


class _Round:
    """What both sides derive from the setup: parties, graph, share points, labels."""

    def __init__(self, job_id: str, round_index: int, parties: Sequence[str], config: SecaggConfig) -> None:
        if len(parties) < 2:
            raise SecaggError("secure aggregation needs at least 2 nodes")
        self.parties = sorted(parties)
        self.config = config
        self.graph = neighbours(self.parties, config.degree)
        self.point = {p: i + 1 for i, p in enumerate(self.parties)}
        self.context = f"{job_id}|{round_index}".encode()

    def label(self, use: str) -> bytes:
        return b"fedsilo-secagg/" + use.encode() + b"|" + self.context

    def aad(self, sender: str, recipient: str) -> bytes:
        return f"{sender}->{recipient}|".encode() + self.context

    def commitment(self, kind: str, owner: str, holder: str, share: bytes) -> str:
        """A hash that binds a share to its owner, holder and round: the researcher checks what a holder reveals
        against what the owner committed to, so an altered share is refused, not folded into a wrong secret."""
        tag = f"{kind}|{owner}|{holder}|".encode() + self.context + b"|"
        return hashlib.sha256(b"fedsilo-secagg/commit|" + tag + share).hexdigest()


class NodeSession(_Round):
    """One node's secure-aggregation state for one round (see the module docstring)."""

    def __init__(self, me: str, job_id: str, round_index: int, parties: Sequence[str], config: SecaggConfig) -> None:
        super().__init__(job_id, round_index, parties, config)
        if me not in self.point:
            raise SecaggError(f"node '{me}' is not among the round's parties")
        self.me = me
        hood = len(self.graph[me]) + 1
        t = config.threshold
        # A threshold at or below half the neighbourhood would let two disjoint halves each rebuild a secret;
        # above the neighbourhood, no secret could be rebuilt at all.
        if not hood // 2 < t <= hood:
            raise SecaggError(f"threshold {t} must be above half of this node's {hood} parties and at most {hood}")
        self.c, self.s = KeyPair.generate(), KeyPair.generate()
        self.stage = "keys"
        self._b = b""
        self._keys: dict[str, PublicKeys] = {}
        self._held: dict[str, tuple[bytes, bytes]] = {}  # owner -> (b share, s share) held by this node
        self.peers: set[str] = set()
        """Neighbours that took part in the share stage: the pairwise masks are with exactly these."""
        self.vouched: tuple[str, ...] | None = None
        """The survivor list this node vouched for (Bonawitz et al.'s consistency check); it unmasks no other."""

    def _advance(self, expected: str, new: str) -> None:
        if self.stage != expected:
            raise SecaggError(f"stage '{new}' asked while this round is at '{self.stage}' (each stage runs once)")
        self.stage = new

    def public_keys(self) -> PublicKeys:
        return self.c.public, self.s.public

    def share_keys(self, keys: Mapping[str, PublicKeys]) -> tuple[dict[str, bytes], dict[str, tuple[str, str]]]:
        """Encrypted shares to every neighbour that sent keys, and the commitments for the researcher."""
        if keys.get(self.me) != self.public_keys():
            raise SecaggError("the key list does not carry this node's own keys")
        if set(keys) - set(self.parties):
            raise SecaggError("the key list names nodes outside the round")
        flat = [k for pair in keys.values() for k in pair]
        if len(set(flat)) != len(flat):
            raise SecaggError("the key list repeats a public key")
        recipients = sorted((self.graph[self.me] & keys.keys()) | {self.me})
        if len(recipients) < self.config.threshold:
            raise SecaggError(f"only {len(recipients)} of this node's parties sent keys; "
                              f"threshold {self.config.threshold}")  # fmt: skip
        self._advance("keys", "shares")
        self._keys = dict(keys)
        self._b = os.urandom(32)
        xs, t = [self.point[v] for v in recipients], self.config.threshold
        b_shares = shamir.split(self._b, len(recipients), t, xs)
        s_shares = shamir.split(self.s.private, len(recipients), t, xs)
        boxes: dict[str, bytes] = {}
        commitments: dict[str, tuple[str, str]] = {}
        for v, bs, ss in zip(recipients, b_shares, s_shares, strict=True):
            pair = (bs.to_bytes(), ss.to_bytes())
            commitments[v] = (self.commitment("b", self.me, v, pair[0]), self.commitment("s", self.me, v, pair[1]))
            if v == self.me:
                self._held[v] = pair
            else:
                key = self.c.agree(keys[v][0], self.label("shares"))
                boxes[v] = seal(key, pair[0] + pair[1], self.aad(self.me, v))
        return boxes, commitments

    def receive_shares(self, boxes: Mapping[str, bytes]) -> None:
        """The shares neighbours encrypted to this node; their senders become the peers it masks with."""
        senders = set(boxes)
        if not senders <= self.graph[self.me] & self._keys.keys():
            raise SecaggError("shares from nodes that are not this node's neighbours in the key stage")
        if len(senders) + 1 < self.config.threshold:
            raise SecaggError(f"shares from {len(senders)} neighbour(s): fewer than threshold "
                              f"{self.config.threshold} with this node")  # fmt: skip
        held: dict[str, tuple[bytes, bytes]] = {}
        for u, box in boxes.items():
            key = self.c.agree(self._keys[u][0], self.label("shares"))
            plain = open_sealed(key, box, self.aad(u, self.me))
            size = shamir.SHARE_BYTES
            if len(plain) != 2 * size:
                raise SecaggError(f"the shares from '{u}' have the wrong length")
            pair = (plain[:size], plain[size:])
            if any(shamir.Share.from_bytes(p).x != self.point[self.me] for p in pair):
                raise SecaggError(f"the shares from '{u}' are for another point")
            held[u] = pair
        self._advance("shares", "ready")
        self._held.update(held)
        self.peers = senders

    def mask(self, encoded: np.ndarray) -> np.ndarray:
        """The masked input: encoded + PRG(b) +- the pairwise masks with every peer (mod 2^64). Once per round."""
        self._advance("ready", "masked")
        seeds = {v: self.s.agree(self._keys[v][1], self.label("mask")) for v in sorted(self.peers)}
        return apply_masks(encoded, self._b, seeds, self.me)

    def vouch(self, survivors: Sequence[str]) -> None:
        """Agree to `survivors` as the round's survivor list (the caller signs it): only after this node sent its
        masked input, naming it, and one list per round."""
        listed = tuple(sorted(set(survivors)))
        if self.stage != "masked" or self.me not in listed:
            raise SecaggError("only a node that sent its masked input, and is listed, vouches for the survivors")
        if self.vouched is not None and self.vouched != listed:
            raise SecaggError("this node already vouched for another survivor list this round")
        self.vouched = listed

    def unmask(self, survivors: Sequence[str], dropped: Sequence[str]) -> tuple[dict[str, bytes], dict[str, bytes]]:
        """This node's b shares of the survivors and s shares of the dropped nodes, among those it holds.
        Once per round; a node named in both lists, or fewer survivors than the threshold, is refused."""
        alive, gone = set(survivors), set(dropped)
        if alive & gone:
            raise SecaggError(f"nodes {sorted(alive & gone)} are named both surviving and dropped")
        if len(alive) < self.config.threshold:
            raise SecaggError(f"{len(alive)} surviving node(s): fewer than threshold {self.config.threshold}; "
                              "unmasking would reveal too few updates' sum")  # fmt: skip
        if (alive | gone) - set(self.parties):
            raise SecaggError("the unmask request names nodes outside the round")
        if self.stage not in ("ready", "masked"):
            raise SecaggError(f"stage 'unmask' asked while this round is at '{self.stage}'")
        if self.vouched is not None and tuple(sorted(alive)) != self.vouched:
            raise SecaggError("the survivor list differs from the one this node vouched for")
        if self.stage == "masked" and self.me in gone:  # its s share would unmask its own input with its b share
            raise SecaggError("this node sent its masked input: it cannot be named dropped")
        self.stage = "done"
        self._b = b""
        b = {u: self._held[u][0] for u in sorted(alive) if u in self._held}
        s = {v: self._held[v][1] for v in sorted(gone) if v in self._held}
        return b, s


class ResearcherSession(_Round):
    """The researcher's state for one round: relays keys and shares, sums masked inputs, rebuilds what the
    unmask stage needs, and decodes the weighted mean. It never holds an unmasked individual input."""

    def __init__(self, job_id: str, round_index: int, parties: Sequence[str], config: SecaggConfig) -> None:
        super().__init__(job_id, round_index, parties, config)
        self.fixed = config.fixed_point()
        self.keys: dict[str, PublicKeys] = {}
        self._boxes: dict[str, dict[str, bytes]] = {}  # sender -> recipient -> box
        self._commitments: dict[str, dict[str, tuple[str, str]]] = {}
        self._sum: np.ndarray | None = None
        self.weights: dict[str, int] = {}
        self._revealed: dict[str, dict[str, dict[str, bytes]]] = {"b": {}, "s": {}}  # kind -> owner -> holder
        self.refused: list[str] = []
        """Shares refused at unmask (they did not match their owner's commitment), as 'holder: owner (kind)'."""

    def add_keys(self, node: str, keys: PublicKeys) -> None:
        if node not in self.point or node in self.keys:
            raise SecaggError(f"keys from '{node}', which is not an expected party of this stage")
        self.keys[node] = keys

    def add_shares(self, node: str, boxes: Mapping[str, bytes], commitments: Mapping[str, tuple[str, str]]) -> None:
        expected = self.graph[node] & self.keys.keys()
        if node not in self.keys or node in self._boxes:
            raise SecaggError(f"shares from '{node}', which is not an expected party of this stage")
        if set(boxes) != expected or set(commitments) != expected | {node}:
            raise SecaggError(f"'{node}' sent shares for {sorted(boxes)}, not for its neighbours {sorted(expected)}")
        self._boxes[node] = dict(boxes)
        self._commitments[node] = dict(commitments)

    @property
    def sharers(self) -> list[str]:
        """The nodes that finished the share stage (the only ones asked for a masked input)."""
        return sorted(self._boxes)

    def boxes_for(self, node: str) -> dict[str, bytes]:
        """The encrypted shares addressed to `node` by the nodes that finished the share stage."""
        return {u: boxes[node] for u, boxes in self._boxes.items() if node in boxes}

    def add_masked(self, node: str, masked: np.ndarray, weight: int) -> None:
        if node not in self._boxes or node in self.weights:
            raise SecaggError(f"a masked input from '{node}', which was not asked for one")
        vector = np.asarray(masked, dtype=np.uint64)
        if self._sum is not None and vector.shape != self._sum.shape:
            raise SecaggError(f"'{node}' sent {vector.size} values, expected {self._sum.size}")
        if sum(self.weights.values()) + weight > self.fixed.capacity:
            raise SecaggError(f"the round's samples would pass the encoding's capacity {self.fixed.capacity}")
        self._sum = vector.copy() if self._sum is None else self._sum + vector
        self.weights[node] = weight

    def unmask_lists(self) -> tuple[list[str], list[str]]:
        """(survivors: sent a masked input, dropped: shared but sent none)."""
        survivors = sorted(self.weights)
        if len(survivors) < self.config.threshold:
            raise SecaggError(f"{len(survivors)} node(s) sent a masked input; secure aggregation needs at least "
                              f"threshold = {self.config.threshold}")  # fmt: skip
        return survivors, sorted(set(self._boxes) - set(self.weights))

    def add_unmask(self, holder: str, b_shares: Mapping[str, bytes], s_shares: Mapping[str, bytes]) -> None:
        """A holder's revealed shares; each is checked against its owner's commitment, a bad one refused."""
        survivors, dropped = self.unmask_lists()
        for kind, shares, owners in (("b", b_shares, survivors), ("s", s_shares, dropped)):
            for owner, share in shares.items():
                committed = self._commitments.get(owner, {}).get(holder)
                index = 0 if kind == "b" else 1
                if owner not in owners or committed is None \
                        or self.commitment(kind, owner, holder, share) != committed[index]:  # fmt: skip
                    self.refused.append(f"{holder}: {owner} ({kind})")
                    continue
                self._revealed[kind].setdefault(owner, {})[holder] = share

    def missing(self) -> list[str]:
        """Secrets that still lack `threshold` valid shares."""
        survivors, dropped = self.unmask_lists()
        t = self.config.threshold
        return [f"{o} ({k})" for k, owners in (("b", survivors), ("s", dropped))
                for o in owners if len(self._revealed[k].get(o, {})) < t]  # fmt: skip

    def result(self) -> tuple[np.ndarray, int]:
        """(the weighted mean of the survivors' decoded inputs, their total weight)."""
        survivors, dropped = self.unmask_lists()
        if self.missing():
            raise SecaggError(f"too few valid shares to unmask: {', '.join(self.missing())}")
        assert self._sum is not None
        total, t = self._sum.copy(), self.config.threshold
        for u in survivors:
            b = shamir.combine([shamir.Share.from_bytes(s) for s in self._revealed["b"][u].values()], t)
            add_signed(total, prg(b, total.size), -1)
        for v in dropped:
            private = shamir.combine([shamir.Share.from_bytes(s) for s in self._revealed["s"][v].values()], t)
            key = KeyPair.from_private(private)
            if key.public != self.keys[v][1]:
                raise SecaggError(f"the rebuilt mask key of '{v}' does not match its public key")
            for u in sorted(self.graph[v] & set(survivors)):
                seed = key.agree(self.keys[u][1], self.label("mask"))
                add_signed(total, prg(seed, total.size), -pairwise_sign(u, v))
        weight = sum(self.weights.values())
        return self.fixed.decode(total, weight), weight
