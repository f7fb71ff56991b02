"""Wire messages: every received payload is validated; invalid ones yield a readable reason."""

import json

import pytest

from fedsilo.common import PROTOCOL_VERSION
from fedsilo.common.errors import ErrorCode, RemoteError
from fedsilo.network import messages as m

SHA = "ab" * 32


def _train(**overrides):
    params = m.BlobRef(sha256=SHA, size=20)
    fields = dict(sender="researcher", job_id="job1", round=1, dataset_id="ds1",
                  plan=m.BlobRef(sha256=SHA, size=10), plan_name="Plan", blobs={"params": params})
    fields.update(overrides)
    return m.TrainRequest(**fields)


def test_round_trip_keeps_kind_and_fields():
    msg = _train(training_args={"epochs": 2})
    back = m.parse_message(msg.to_json())
    assert isinstance(back, m.TrainRequest)
    assert back == msg
    assert back.protocol_version == PROTOCOL_VERSION


@pytest.mark.parametrize(
    "payload, fragment",
    [
        (b"not json at all", "invalid message"),
        (b'{"kind": "no_such_kind", "sender": "x"}', "kind"),
        (b"[1, 2, 3]", "invalid message"),
        (json.dumps({"kind": "search_request", "sender": "r", "tags": []}).encode(), "tags"),
        (json.dumps({"kind": "ping_request", "sender": "r", "extra": 1}).encode(), "extra"),
        (json.dumps({"kind": "ping_request", "sender": "a/b#"}).encode(), "sender"),
    ],
)
def test_invalid_payloads_raise_message_error(payload, fragment):
    with pytest.raises(m.MessageError) as info:
        m.parse_message(payload)
    assert fragment in str(info.value)


def test_sender_and_request_id_salvaged_from_invalid_message():
    payload = json.dumps({"kind": "train_request", "sender": "res-1", "request_id": "r42"}).encode()
    with pytest.raises(m.MessageError) as info:
        m.parse_message(payload)
    assert (info.value.sender, info.value.request_id) == ("res-1", "r42")


def test_unsafe_sender_is_not_salvaged():
    payload = json.dumps({"kind": "x", "sender": "fedsilo/v1/#", "request_id": "r"}).encode()
    with pytest.raises(m.MessageError) as info:
        m.parse_message(payload)
    assert info.value.sender == ""


def test_oversized_message_refused_before_parsing():
    payload = b'{"kind": "ping_request", "sender": "r", "pad": "' + b"x" * m.MAX_MESSAGE_BYTES + b'"}'
    with pytest.raises(m.MessageError, match="exceeds"):
        m.parse_message(payload)


def test_blob_ref_requires_a_sha256():
    with pytest.raises(ValueError):
        m.BlobRef(sha256="../../etc/passwd", size=1)


def test_remote_error_names_node_stage_and_next_step():
    err = RemoteError("hospital-a", ErrorCode.PLAN_NOT_APPROVED.value, f"plan {SHA} is not approved", "approval")
    text = str(err)
    assert "hospital-a" in text and "approval" in text and SHA in text and "data manager" in text


def test_training_args_and_algorithm_are_typed_and_checked_on_receipt():
    fedprox = {"name": "fedprox", "config": {"mu": 0.1}}
    msg = _train(training_args={"loader_args": {"batch_size": 48}}, algorithm=fedprox)
    back = m.parse_message(msg.to_json())
    assert back.training_args.batch_size == 48 and back.algorithm.parse().mu == 0.1
    bad_args = msg.to_json().replace(b'"epochs":1', b'"batch_maxnum":1')
    with pytest.raises(m.MessageError, match="num_updates") as err:
        m.parse_message(bad_args)
    assert err.value.field == "training_args"
    bad_algo = msg.to_json().replace(b'"mu":0.1', b'"mu":-1.0')
    with pytest.raises(m.MessageError, match="mu") as err:
        m.parse_message(bad_algo)
    assert err.value.field.startswith("algorithm")


def test_blobs_must_hold_the_parameters():
    with pytest.raises(ValueError, match="params"):
        _train(blobs={"control": m.BlobRef(sha256=SHA, size=1)})


def test_a_reply_is_built_from_its_request():
    req = _train()
    ack = m.TaskAck.for_request(req, "hospital-a", "Hospital A", job_id=req.job_id, round=req.round)
    assert (ack.sender, ack.node_id, ack.node_name, ack.in_reply_to) == ("hospital-a", "hospital-a", "Hospital A",
                                                                        req.request_id)  # fmt: skip
