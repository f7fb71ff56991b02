"""The researcher's half of secure aggregation (`Experiment(..., secure_aggregation=True)`, Fed-BioMed's name):
the round learns only the weighted sum of the nodes' updates, never one node's.

Around a `TrainingRound`: before the train requests, `SecaggRound.prepare` runs the setup stage (each node's
public keys) and the share stage (each node's encrypted shares, relayed to their recipients inside the train
requests); each TrainReply's `params` is a masked int64 blob folded by `add`; after the replies, `finish` asks
the nodes that shared for the unmask stage (b shares of the nodes whose input arrived, s shares of those that
dropped after sharing), removes the masks, decodes the weighted mean of the updates and hands it to the
algorithm as one update. Only mean-based algorithms qualify: Krum, median, trimmed mean need each update, and
SCAFFOLD's control variates would travel in clear.

    exp = Experiment(..., aggregator=FedAverage(), secure_aggregation=True)
    exp = Experiment(..., secure_aggregation=SecureAggregation(degree=4, clipping_range=4.0))   # SecAgg+
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedsilo.common.secagg import ResearcherSession, SecaggError
from fedsilo.common.secagg.config import SecaggConfig
from fedsilo.common.secagg.layout import from_blob, unflatten
from fedsilo.network.messages import (
    Reply,
    TrainReply,
)
from fedsilo.network.secagg_messages import (
    SecaggKeys,
    SecaggKeysReply,
    SecaggSetupRequest,
    SecaggShareRequest,
    SecaggSharesReply,
    SecaggTask,
    SecaggUnmaskReply,
    SecaggUnmaskRequest,
)

from .algorithms.base import FedAlgorithm, NodeUpdate, Params
from .algorithms.fedavg import FedAverage
from .settings import ExperimentError

if TYPE_CHECKING:
    from .round import RoundContext

log = logging.getLogger(__name__)

AGGREGATE_NODE = "secure-aggregate"
"""The node id under which the unmasked weighted mean reaches the algorithm (one update for the round)."""

DropFn = Callable[[str, str, str], None]
"""(node, kind, reason): leaves a node out of the round."""


@dataclass(frozen=True)
class SecureAggregation:
    """Secure aggregation's settings (`Experiment(secure_aggregation=...)`; True means these defaults).

    `threshold`: shares that rebuild a secret, and the fewest nodes whose sum the researcher can ever learn
    (default: a majority of each node's neighbourhood); `degree`: SecAgg+'s neighbours per node (None: all);
    `clipping_range`, `fraction_bits`: the fixed-point encoding of each update minus the global model
    (common/secagg/fixedpoint.py states the error bound); `stage_timeout`: how long a key, share or unmask
    stage waits for the nodes (s).

        SecureAggregation(degree=4, clipping_range=4.0)
    """

    threshold: int | None = None
    degree: int | None = None
    clipping_range: float = 8.0
    fraction_bits: int = 32
    stage_timeout: float = 30.0

    @classmethod
    def of(cls, value: bool | SecureAggregation | None, algorithm: FedAlgorithm) -> SecureAggregation | None:
        """`Experiment(secure_aggregation=value)` as settings (None: off), refused for `algorithm` when it needs
        each node's update."""
        if value is None or value is False:
            return None
        if value is not True and not isinstance(value, SecureAggregation):
            raise ExperimentError(f"secure_aggregation must be True, False or a SecureAggregation, got {value!r}")
        cls.check_algorithm(algorithm)
        return cls() if value is True else value

    @staticmethod
    def state_of(settings: SecureAggregation | None) -> dict[str, Any] | None:
        """The settings as breakpoint JSON (None: off)."""
        return None if settings is None else dataclasses.asdict(settings)

    @classmethod
    def from_state(cls, state: dict[str, Any] | None, algorithm: FedAlgorithm) -> SecureAggregation | None:
        """Settings back from `state_of` (checked against the resumed algorithm like a new experiment's)."""
        return None if state is None else cls.of(cls(**state), algorithm)

    def config_for(self, nodes: list[str]) -> SecaggConfig:
        n = len(nodes)
        if n < 2:
            raise ExperimentError("secure aggregation needs at least 2 nodes in the round")
        hood = n if self.degree is None else min(self.degree + 1, n)
        return SecaggConfig(threshold=self.threshold or hood // 2 + 1, degree=self.degree,
                            clipping_range=self.clipping_range, fraction_bits=self.fraction_bits)  # fmt: skip

    @staticmethod
    def check_algorithm(algorithm: FedAlgorithm) -> None:
        """Refuse an algorithm that needs each node's update (or blobs besides the parameters)."""
        if not isinstance(algorithm, FedAverage) or algorithm.reply_blobs != frozenset({"params"}):
            raise ExperimentError(f"secure aggregation gives the researcher only the weighted mean of the updates; "
                                  f"{type(algorithm).__name__} needs each node's update or extra blobs. Use "
                                  "FedAverage, FedProx, FedAdagrad, FedAdam or FedYogi")  # fmt: skip


class SecaggRound:
    """One round's secure-aggregation stages on the researcher's side (see the module docstring)."""

    def __init__(self, settings: SecureAggregation, ctx: RoundContext, round_index: int, nodes: Iterable[str]) -> None:
        settings.check_algorithm(ctx.algorithm)  # the aggregator may have been changed since construction
        self.settings, self.ctx, self.index = settings, ctx, round_index
        self.nodes = sorted(nodes)
        self.config = settings.config_for(self.nodes)
        self.session = ResearcherSession(ctx.job_id, round_index, self.nodes, self.config)
        self.stats: dict[str, float] = {}
        self.signed = False
        rows = sum((ctx.training_data[n].shape or [0])[0] for n in self.nodes)
        if rows > self.session.fixed.capacity:
            raise ExperimentError(f"the round's {rows} samples exceed the fixed-point capacity "
                                  f"{self.session.fixed.capacity}: lower fraction_bits or clipping_range")  # fmt: skip

    def _collect(self, request: Any, nodes: list[str], kind: type[Reply], drop: DropFn) -> dict[str, Reply]:
        got = self.ctx.requests.collect(request, nodes=nodes, timeout=self.settings.stage_timeout)
        for node, err in got.errors.items():
            drop(node, "error", f"secure aggregation: {err}")
        for node in got.missing:
            drop(node, "timeout", f"no {request.kind} answer within {self.settings.stage_timeout:g}s")
        ok = {}
        for node, reply in got.replies.items():
            if isinstance(reply, kind) and reply.job_id == self.ctx.job_id and reply.round == self.index:
                ok[node] = reply
            else:
                drop(node, "invalid", f"answered {request.kind} with {reply.kind}")
        return ok

    def prepare(self, drop: DropFn) -> list[str]:
        """The setup and share stages; returns the nodes to send train requests to (they shared)."""
        t0, party = time.perf_counter(), self.ctx.requests.party
        common: dict[str, Any] = {"job_id": self.ctx.job_id, "round": self.index}
        setup = SecaggSetupRequest(sender=party, nodes=self.nodes, config=self.config, **common)
        signed: dict[str, SecaggKeys] = {}  # relayed as the nodes signed them: each checks the others' signatures
        for node, reply in self._collect(setup, self.nodes, SecaggKeysReply, drop).items():
            assert isinstance(reply, SecaggKeysReply)
            self.session.add_keys(node, (bytes.fromhex(reply.keys.c), bytes.fromhex(reply.keys.s)))
            signed[node] = reply.keys
        self.signed = all(k.sig for k in signed.values())  # nodes with signing keys also check survivor lists
        share = SecaggShareRequest(sender=party, keys=signed, **common)
        keyed = sorted(signed)
        for node, reply in self._collect(share, keyed, SecaggSharesReply, drop).items():
            assert isinstance(reply, SecaggSharesReply)
            try:
                self.session.add_shares(node, {v: bytes.fromhex(b) for v, b in reply.boxes.items()},
                                        dict(reply.commitments))  # fmt: skip
            except SecaggError as exc:
                drop(node, "invalid", f"secure aggregation: {exc}")
        self.stats["secagg_prepare_s"] = time.perf_counter() - t0
        if len(self.session.sharers) < self.config.threshold:
            raise SecaggError(f"round {self.index}: {len(self.session.sharers)} node(s) finished the share stage; "
                              f"secure aggregation needs threshold = {self.config.threshold}")  # fmt: skip
        return self.session.sharers

    def task(self, node: str) -> SecaggTask:
        return SecaggTask(shares={u: box.hex() for u, box in self.session.boxes_for(node).items()})

    def add(self, node: str, reply: TrainReply, blob: Params) -> None:
        """A node's masked update (its `params` blob): int64 in the model's layout, weighed by its sample count."""
        self.session.add_masked(node, from_blob(blob, self.ctx.global_params), reply.sample_size)

    def _vouched(self, common: dict[str, Any]) -> dict[str, str]:
        """The survivors' signatures of the survivor list (Bonawitz et al.'s consistency check)."""
        check = SecaggUnmaskRequest(check_only=True, **common)
        got = self.ctx.requests.collect(check, nodes=common["survivors"], timeout=self.settings.stage_timeout)
        sigs = {n: r.consistency for n, r in got.replies.items() if isinstance(r, SecaggUnmaskReply) and r.consistency}
        if len(sigs) < self.config.threshold:
            raise SecaggError(f"{len(sigs)} survivor(s) vouched for the survivor list; threshold "
                              f"{self.config.threshold} needed")  # fmt: skip
        return sigs

    def finish(self, drop: DropFn) -> NodeUpdate:
        """The unmask stage, then the weighted mean of the updates as one update for the algorithm."""
        t0 = time.perf_counter()
        survivors, dropped = self.session.unmask_lists()
        common: dict[str, Any] = {"sender": self.ctx.requests.party, "job_id": self.ctx.job_id, "round": self.index,
                                  "survivors": survivors, "dropped": dropped}  # fmt: skip
        consistency = self._vouched(common) if self.signed else {}
        request = SecaggUnmaskRequest(consistency=consistency, **common)
        got = self.ctx.requests.collect(request, nodes=self.session.sharers, timeout=self.settings.stage_timeout)
        for node, reply in got.replies.items():
            if isinstance(reply, SecaggUnmaskReply):
                self.session.add_unmask(node, _unhex(reply.b_shares), _unhex(reply.s_shares))
        for node, err in got.errors.items():
            log.warning("round %d: %s did not unmask: %s", self.index, node, err)
        if self.session.refused:
            log.warning("round %d: shares refused (they do not match their commitments): %s", self.index,
                        "; ".join(self.session.refused))  # fmt: skip
        mean, weight = self.session.result()
        reference = self.ctx.global_params
        delta = unflatten(mean, reference)
        params = {k: reference[k].double() + delta[k] for k in reference}
        self.stats["secagg_unmask_s"] = time.perf_counter() - t0
        log.info("round %d: secure aggregate of %d node(s) (%d dropped after sharing), %d samples", self.index,
                 len(survivors), len(dropped), weight)  # fmt: skip
        return NodeUpdate(AGGREGATE_NODE, {"params": params}, weight)


def _unhex(shares: Mapping[str, str]) -> dict[str, bytes]:
    return {k: bytes.fromhex(v) for k, v in shares.items()}
