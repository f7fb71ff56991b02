"""The node's half of secure aggregation: per-round sessions across the stage messages, and the round's
two stages that use them.

The dispatcher thread answers the stage requests (setup -> keys, share -> encrypted shares, unmask -> the
shares of others); the task runner opens the shares addressed to this node before the worker runs
(`open_shares`) and replaces the update by its masked encoding after the node's protections (`mask_update`).
A session lives in the daemon's memory only: its secrets (the mask key, the self-mask seed) never touch disk,
so a daemon that restarts mid-round is a dropped node, which the protocol recovers from.

    sessions = SecaggSessions("hospital-a")
    reply = sessions.answer(setup_request, answer)     # a SecaggKeysReply, or an ErrorReply (FS800)
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fedsilo.common.errors import ErrorCode
from fedsilo.common.secagg import NodeSession, SecaggError
from fedsilo.network.messages import (
    ErrorReply,
    Message,
    Reply,
    TaskRequest,
    TrainRequest,
)
from fedsilo.network.secagg_messages import (
    SecaggKeys,
    SecaggKeysReply,
    SecaggRequest,
    SecaggSetupRequest,
    SecaggShareRequest,
    SecaggSharesReply,
    SecaggUnmaskReply,
    SecaggUnmaskRequest,
)

from .secagg_auth import KeyAuthority, statement, survivors_statement
from .stages import stage

if TYPE_CHECKING:
    from .config import NodeConfig
    from .daemon_round import DaemonRound

log = logging.getLogger("fedsilo.node.secagg")

MAX_SESSIONS = 64
"""Rounds whose state a node keeps at once (oldest dropped first): a researcher cannot grow its memory."""
SESSION_TTL_S = 24 * 3600.0
"""A session unused this long is dropped: no round waits a day between two stages."""

Answer = Callable[..., Reply]
"""`NodeDaemon._answer`: (reply kind, request, **fields) -> reply from this node."""


@dataclass
class _Entry:
    session: NodeSession
    lock: threading.Lock = field(default_factory=threading.Lock)
    replies: dict[str, Reply] = field(default_factory=dict)
    used: float = field(default_factory=time.monotonic)


class SecaggSessions:
    """A node's secure-aggregation sessions, keyed by (researcher, job, round); thread-safe.

    Each stage request is answered once; a re-sent copy (same request id) gets the same answer, and a new
    request for a stage already run is refused (FS800): a researcher asking twice must not get two views.

        sessions = SecaggSessions(node_id)
        if sessions.handles(msg):
            reply = sessions.answer(msg, daemon._answer)
    """

    def __init__(self, node_id: str, authority: KeyAuthority | None = None) -> None:
        self.node_id = node_id
        self.authority = authority
        """Signs this node's keys and checks the others' (None: keys relayed unauthenticated, logged)."""
        if authority is None:
            log.warning("no signing key: secure-aggregation keys are not authenticated (researcher trusted)")
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, str, int], _Entry] = OrderedDict()

    @staticmethod
    def handles(msg: Message) -> bool:
        return isinstance(msg, SecaggRequest)

    def _entry(self, key: tuple[str, str, int]) -> _Entry:
        with self._lock:
            self._expire()
            entry = self._entries.get(key)
            if entry is None:
                raise SecaggError(f"no secure-aggregation setup for job {key[1]} round {key[2]} on this node "
                                  "(never set up, expired, or the node restarted since)")  # fmt: skip
            entry.used = time.monotonic()
            return entry

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, e in self._entries.items() if now - e.used > SESSION_TTL_S]:
            del self._entries[key]

    def answer(self, msg: SecaggRequest, answer: Answer) -> Reply:
        """The reply to a stage request: the stage's answer, or an ErrorReply (FS800) saying why not."""
        key = (msg.sender, msg.job_id, msg.round)
        try:
            entry = self._setup(key, msg) if isinstance(msg, SecaggSetupRequest) else self._entry(key)
            with entry.lock:
                if msg.request_id not in entry.replies:
                    entry.replies[msg.request_id] = self._stage(entry.session, msg, answer)
                return entry.replies[msg.request_id]
        except SecaggError as exc:
            log.warning("[%s] secure aggregation refused for %s: %s", msg.request_id, msg.sender, exc)
            return answer(ErrorReply, msg, code=ErrorCode.SECAGG_FAILED, message=str(exc)[:3900],
                          stage="secure_aggregation", job_id=msg.job_id, round=msg.round)  # fmt: skip

    def _setup(self, key: tuple[str, str, int], msg: SecaggSetupRequest) -> _Entry:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                if msg.request_id in entry.replies:
                    return entry  # a re-sent copy
                raise SecaggError(f"job {msg.job_id} round {msg.round} was already set up (keys are made once a round)")
            entry = _Entry(NodeSession(self.node_id, msg.job_id, msg.round, msg.nodes, msg.config))
            self._entries[key] = entry
            while len(self._entries) > MAX_SESSIONS:
                self._entries.popitem(last=False)
            return entry

    def _stage(self, session: NodeSession, msg: SecaggRequest, answer: Answer) -> Reply:
        common = {"job_id": msg.job_id, "round": msg.round}
        if isinstance(msg, SecaggSetupRequest):
            c, s = session.public_keys()
            sig = self.authority.sign(statement(msg.sender, msg.job_id, msg.round, self.node_id, c, s)) \
                if self.authority is not None else None  # fmt: skip
            return answer(SecaggKeysReply, msg, keys=SecaggKeys(c=c.hex(), s=s.hex(), sig=sig), **common)
        if isinstance(msg, SecaggShareRequest):
            keys = {n: (bytes.fromhex(k.c), bytes.fromhex(k.s)) for n, k in msg.keys.items()}
            self._authenticate(msg, keys)
            boxes, commitments = session.share_keys(keys)
            return answer(SecaggSharesReply, msg, boxes={v: b.hex() for v, b in boxes.items()},
                          commitments=commitments, **common)  # fmt: skip
        if isinstance(msg, SecaggUnmaskRequest):
            vouch = survivors_statement(msg.sender, msg.job_id, msg.round, msg.survivors)
            if msg.check_only:  # the consistency check: this node signs the one survivor list it accepts
                session.vouch(msg.survivors)
                sig = self.authority.sign(vouch) if self.authority is not None else None
                return answer(SecaggUnmaskReply, msg, b_shares={}, s_shares={}, consistency=sig, **common)
            self._consistent(msg, vouch, session.config.threshold)
            b, s = session.unmask(msg.survivors, msg.dropped)
            log.info("[%s] unmask for job %s round %d: %d b share(s), %d s share(s)", msg.request_id, msg.job_id,
                     msg.round, len(b), len(s))  # fmt: skip
            return answer(SecaggUnmaskReply, msg, b_shares={k: v.hex() for k, v in b.items()},
                          s_shares={k: v.hex() for k, v in s.items()}, **common)  # fmt: skip
        raise SecaggError(f"unknown secure-aggregation stage {msg.kind}")

    def _authenticate(self, msg: SecaggShareRequest, keys: dict[str, tuple[bytes, bytes]]) -> None:
        """Every other node's keys must carry its own signature for this researcher, job and round."""
        if self.authority is None:
            return
        for node, (c, s) in sorted(keys.items()):
            if node == self.node_id:
                continue
            sig = msg.keys[node].sig
            if sig is None:
                raise SecaggError(f"the keys given for '{node}' carry no signature")
            self.authority.verify(node, statement(msg.sender, msg.job_id, msg.round, node, c, s), sig)

    def _consistent(self, msg: SecaggUnmaskRequest, vouch: bytes, threshold: int) -> None:
        """At least `threshold` survivors signed this very survivor list: a researcher cannot show different
        lists to different nodes (each survivor signs one list, and two lists would need more than n signers)."""
        if self.authority is None:
            return
        auth = self.authority
        signers = [n for n, sig in sorted(msg.consistency.items()) if n in msg.survivors and auth.valid(n, vouch, sig)]
        if len(signers) < threshold:
            raise SecaggError(f"the survivor list carries {len(signers)} valid survivor signature(s); "
                              f"threshold {threshold} needed before any share is revealed")  # fmt: skip

    @contextmanager
    def session_for(self, request: TaskRequest) -> Iterator[NodeSession]:
        """The session a training request continues (its researcher, job and round), held for the block."""
        entry = self._entry((request.sender, request.job_id, request.round))
        with entry.lock:
            yield entry.session


def refusal(msg: Message, config: NodeConfig) -> str | None:
    """Why a training request must be refused under `[node] force_secure_aggregation` (None: it may run)."""
    if isinstance(msg, TrainRequest) and msg.secagg is None and config.node.force_secure_aggregation:
        return (f"node '{config.node.name}' trains only under secure aggregation ([node] force_secure_aggregation);"
                " ask with Experiment(..., secure_aggregation=True)")  # fmt: skip
    return None


# ------------------------------------------------------------------------------------- the round's stages
@stage("secure_aggregation", ErrorCode.SECAGG_FAILED)
def open_shares(r: DaemonRound) -> None:
    """Before any training: the neighbours' shares addressed to this node, decrypted and checked (a bad box
    fails the round here, before plan code runs); a plain request on a forcing node is refused again."""
    req = r.request
    why = refusal(req, r.node.config)
    if why is not None:
        raise SecaggError(why)
    if isinstance(req, TrainRequest) and req.secagg is not None:
        shares = {u: bytes.fromhex(box) for u, box in req.secagg.shares.items()}
        sessions: SecaggSessions = r.node.secagg
        with sessions.session_for(req) as session:
            session.receive_shares(shares)


@stage("secure_aggregation", ErrorCode.SECAGG_FAILED)
def mask_update(r: DaemonRound) -> None:
    """After the node's protections: `params` becomes sample_size * (update - received), fixed-point encoded
    and masked; the researcher can read it only summed with the other nodes' (common/secagg)."""
    req = r.request
    if not isinstance(req, TrainRequest) or req.secagg is None:
        return
    from fedsilo.common.arrays import arrays_from_bytes, arrays_to_bytes
    from fedsilo.common.secagg.layout import flat_delta, to_blob

    if set(r.worker_blobs) != {"params"}:
        raise SecaggError(f"only 'params' can be aggregated securely; the round returned {sorted(r.worker_blobs)}")
    sessions: SecaggSessions = r.node.secagg
    t0 = time.perf_counter()
    delta = flat_delta(arrays_from_bytes(r.worker_blobs["params"], copy=False), r.received)  # numpy: no torch here
    with sessions.session_for(req) as session:
        encoded, clipped = session.config.fixed_point().encode(delta, r.sample_size)
        masked = session.mask(encoded)
    r.worker_blobs = {"params": arrays_to_bytes(to_blob(masked, r.received))}
    r.applied["secure_aggregation"] = {"requested": None, "applied": True, "weight": r.sample_size,
                                       "clipped_values": clipped, "mask_s": round(time.perf_counter() - t0, 4)}
