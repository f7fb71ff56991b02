"""The node daemon's secure-aggregation sessions (node/secagg.py) without processes: each stage answered once,
re-sent copies answered alike, the consistency check of survivor lists, and `force_secure_aggregation`."""

from __future__ import annotations

import numpy as np

from fedsilo.common.secagg.config import SecaggConfig
from fedsilo.network.messages import (
    BlobRef,
    ErrorReply,
    Reply,
    TrainRequest,
)
from fedsilo.network.secagg_messages import (
    SecaggKeysReply,
    SecaggSetupRequest,
    SecaggShareRequest,
    SecaggTask,
    SecaggUnmaskReply,
    SecaggUnmaskRequest,
)
from fedsilo.node.config import NodeConfig
from fedsilo.node.secagg import SecaggSessions, refusal
from tests.support.secagg import authorities

REF = BlobRef(sha256="0" * 64, size=1)


def _answer(kind: type[Reply], request, **fields) -> Reply:
    return kind.for_request(request, "b", "b", **fields)


def test_each_stage_is_answered_once_and_resends_alike() -> None:
    sessions = SecaggSessions("b")
    common = {"sender": "r1", "job_id": "job", "round": 0}
    setup = SecaggSetupRequest(nodes=["a", "b", "c"], config=SecaggConfig(threshold=2), **common)
    keys = sessions.answer(setup, _answer)
    assert isinstance(keys, SecaggKeysReply) and keys.keys.sig is None  # no signing key given here
    assert sessions.answer(setup.model_copy(update={"timestamp": setup.timestamp + 1}), _answer) == keys
    second = sessions.answer(SecaggSetupRequest(nodes=["a", "b", "c"], config=SecaggConfig(threshold=2), **common),
                             _answer)  # fmt: skip
    assert isinstance(second, ErrorReply) and second.code == "FS800" and "already set up" in second.message
    other = sessions.answer(SecaggShareRequest(keys={}, sender="r2", job_id="job", round=0), _answer)
    assert isinstance(other, ErrorReply) and "no secure-aggregation setup" in other.message  # another researcher's
    weak = sessions.answer(SecaggSetupRequest(nodes=["a", "b", "c", "d"], config=SecaggConfig(threshold=2),
                                              sender="r1", job_id="job", round=1), _answer)  # fmt: skip
    assert isinstance(weak, ErrorReply) and "above half" in weak.message


def test_force_secure_aggregation_refuses_plain_training() -> None:
    cfg = NodeConfig.model_validate({"node": {"name": "b", "node_id": "b", "force_secure_aggregation": True}})
    plain = TrainRequest(sender="r1", job_id="j", round=0, dataset_id="d", plan=REF, plan_name="P",
                         blobs={"params": REF})  # fmt: skip
    assert "force_secure_aggregation" in (refusal(plain, cfg) or "")
    assert refusal(plain.model_copy(update={"secagg": SecaggTask(shares={})}), cfg) is None
    cfg.node.force_secure_aggregation = False
    assert refusal(plain, cfg) is None


def test_shares_are_revealed_only_for_a_survivor_list_threshold_survivors_signed() -> None:
    """Three nodes' sessions with signing keys, driven as the researcher relays: the unmask stage needs threshold
    survivors' signatures of the very list it names, and a survivor vouches for one list only."""
    parties = ["a", "b", "c"]
    auth = authorities({"a": "node", "b": "node", "c": "node"})
    nodes = {p: SecaggSessions(p, auth[p]) for p in parties}
    common = {"sender": "r1", "job_id": "job", "round": 0}

    def ask(p: str, msg) -> Reply:
        reply = nodes[p].answer(msg, lambda kind, req, **f: kind.for_request(req, p, p, **f))
        assert not isinstance(reply, ErrorReply) or msg.kind == "secagg_unmask_request", reply
        return reply

    setup = SecaggSetupRequest(nodes=parties, config=SecaggConfig(threshold=2), **common)
    keys = {p: ask(p, setup).keys for p in parties}  # type: ignore[attr-defined]
    shares = {p: ask(p, SecaggShareRequest(keys=keys, **common)) for p in parties}
    for p in parties:
        train = TrainRequest(sender="r1", job_id="job", round=0, dataset_id="d", plan=REF, plan_name="P",
                             blobs={"params": REF})  # fmt: skip
        with nodes[p].session_for(train) as session:
            session.receive_shares({u: bytes.fromhex(shares[u].boxes[p]) for u in parties if u != p})  # type: ignore[attr-defined]
            session.mask(np.zeros(4, np.uint64))

    listed = {"survivors": parties, "dropped": [], **common}
    unsigned = ask("a", SecaggUnmaskRequest(**listed))
    assert isinstance(unsigned, ErrorReply) and "0 valid survivor signature(s)" in unsigned.message
    sigs = {p: ask(p, SecaggUnmaskRequest(check_only=True, **listed)).consistency for p in ("a", "b")}  # type: ignore[attr-defined]
    other = ask("a", SecaggUnmaskRequest(check_only=True, survivors=["a", "b"], dropped=["c"], **common))
    assert isinstance(other, ErrorReply) and "another survivor list" in other.message
    forged = ask("c", SecaggUnmaskRequest(consistency={"a": sigs["a"], "b": sigs["a"]}, **listed))
    assert isinstance(forged, ErrorReply) and "1 valid survivor signature(s)" in forged.message
    shown = ask("c", SecaggUnmaskRequest(consistency=sigs, survivors=["a", "b"], dropped=["c"], **common))
    assert isinstance(shown, ErrorReply) and "0 valid" in shown.message  # signed for another list
    ok = ask("c", SecaggUnmaskRequest(consistency=sigs, **listed))
    assert isinstance(ok, SecaggUnmaskReply) and sorted(ok.b_shares) == parties and ok.s_shares == {}
