"""The node daemon's secure-aggregation sessions (node/secagg.py) without processes: each stage answered once,
re-sent copies answered alike, and `force_secure_aggregation` refusing plain training requests."""

from __future__ import annotations

from fedsilo.common.secagg.config import SecaggConfig
from fedsilo.network.messages import (
    BlobRef,
    ErrorReply,
    Reply,
    SecaggKeysReply,
    SecaggSetupRequest,
    SecaggShareRequest,
    SecaggTask,
    TrainRequest,
)
from fedsilo.node.config import NodeConfig
from fedsilo.node.secagg import SecaggSessions, refusal

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
