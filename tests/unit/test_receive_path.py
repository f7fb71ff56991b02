"""The one receive path: bounded JSON, `parse_message` raising only `MessageError`, salvaged ids."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsilo.common.safejson import JSONLimitError, check_json, json_depth, loads_bounded
from fedsilo.network import topics
from fedsilo.network.messages import MAX_MESSAGE_BYTES, MessageError, PingRequest, parse_message

DEEP = b"[" * 20000 + b"]" * 20000  # the ~40 KB message that silenced a node for good


def test_deep_json_is_refused_without_recursing() -> None:
    assert json_depth(DEEP) == 20000
    with pytest.raises(JSONLimitError, match="20000 levels"):
        loads_bounded(DEEP, max_bytes=1 << 20)
    with pytest.raises(MessageError, match="nested"):
        parse_message(DEEP)


def test_brackets_inside_strings_do_not_count() -> None:
    text = json.dumps({"sender": "x", "note": "[" * 100 + "{" * 100})
    assert json_depth(text) == 1
    check_json(text, max_bytes=10_000, max_depth=2)


def test_an_invalid_message_still_names_its_sender_when_readable() -> None:
    payload = b'{"sender": "researcher", "request_id": "r-1", "kind": "ping_request", "x": ' + DEEP[:200] + b"}"
    with pytest.raises(MessageError) as err:
        parse_message(payload)
    assert (err.value.sender, err.value.request_id) == ("researcher", "r-1")


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_are_invalid(value: str) -> None:
    fields = json.dumps(PingRequest(sender="r").model_dump(mode="json"))
    payload = fields.replace('"timestamp":', f'"timestamp": {value}, "_":')
    with pytest.raises(MessageError):
        parse_message(payload.encode())


def test_oversize_is_refused_before_parsing() -> None:
    with pytest.raises(MessageError, match="limit"):
        parse_message(b" " * (MAX_MESSAGE_BYTES + 1))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=2000),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
            lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
            max_leaves=40,
        ).map(lambda v: json.dumps(v, allow_nan=True).encode()),
        st.integers(min_value=1, max_value=5000).map(lambda n: b"{" * n + b"}" * n),
        st.fixed_dictionaries(
            {
                "kind": st.sampled_from(["ping_request", "train_request", "train_reply", "presence", "nope"]),
                "sender": st.text(max_size=200),
                "request_id": st.text(max_size=200),
                "timestamp": st.one_of(st.floats(), st.integers(), st.text(max_size=5)),
            }
        ).map(lambda d: json.dumps(d, allow_nan=True).encode()),
    )
)
def test_parse_message_raises_only_message_error(payload: bytes) -> None:
    with contextlib.suppress(MessageError):  # anything else (RecursionError, TypeError, ...) fails the test
        parse_message(payload)


def test_topics_name_their_publisher() -> None:
    assert topics.publisher(topics.node("n1", "r1")) == "r1"
    assert topics.publisher(topics.broadcast("r1")) == "r1"
    assert topics.publisher(topics.researcher("r1", "n1")) == "n1"
    assert topics.publisher(topics.presence("n1")) == "n1"
    assert topics.publisher("fedsilo/v1/node/n1") == ""
    assert topics.publisher("elsewhere/v1/node/n1/r1") == ""
