"""What leaves the node is released on purpose: an ErrorReply carries a code, a stage and a safe message.

Approved plans raise, in a real round on a node daemon, exceptions whose text holds a secret-looking string
and a row of the node's dataset: the reply names the exception's type and an error id, never the text; the
node's log holds the text and the traceback under that id. A plan cannot launder its text through fedsilo's
own exception types or a class of its own named after it; a message fedsilo's code wrote is still released.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from tests.support.brokers import BOTH
from tests.support.one_node import OneNode
from tests.support.plans import LOGREG_PLAN

pytestmark = pytest.mark.broker("embedded")  # the node is the subject here; tests/conftest.py

STEP = "    def training_step(self, data, target):"
LEAK = "f\"password=hunter2 {open(self.dataset_path).read().splitlines()[1]}\""
"""The exception text each plan builds: a secret-looking string and the first row of the node's data."""

VALUE_ERROR = LOGREG_PLAN.replace(STEP, STEP + f"\n        raise ValueError({LEAK})")
FEDSILO_TYPE = LOGREG_PLAN.replace(STEP, STEP + f"""
        from fedsilo.common.errors import NonFiniteError
        raise NonFiniteError({LEAK})""")
OWN_CLASS = LOGREG_PLAN.replace(STEP, STEP + f"""
        text = {LEAK}
        raise type("Leak_" + "".join(c if c.isalnum() else "_" for c in text), (Exception,), {{}})()""")
AT_LOAD = LOGREG_PLAN.replace("class HeartPlan", 'raise RuntimeError("password=hunter2 at load")\n\n\nclass HeartPlan')
NOT_A_DATA_MANAGER = LOGREG_PLAN.replace("return DataManager(CsvDataset(self.dataset_path), batch_size=batch_size, "
                                         "shuffle=True)", "return [1, 2, 3]")  # fmt: skip
PLANS = [VALUE_ERROR, FEDSILO_TYPE, OWN_CLASS, AT_LOAD, NOT_A_DATA_MANAGER, LOGREG_PLAN]


@pytest.fixture(scope="module", params=BOTH)
def node(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OneNode]:
    one = OneNode.start(tmp_path_factory.mktemp(f"errors-{request.param}"), request.param, plans=PLANS)
    yield one
    one.stop()


def first_row(node: OneNode) -> str:
    return (node.data / "d1.csv").read_text().splitlines()[1]


def assert_released_on_purpose(node: OneNode, reply: object, code: str, stage: str, says: str) -> None:
    """The reply: code, stage, `says`, an error id; none of the plan's text, which node.log holds under the id."""
    assert reply.kind == "error", reply  # type: ignore[attr-defined]
    assert (reply.code, reply.stage) == (code, stage), reply  # type: ignore[attr-defined]
    wire = reply.to_json().decode()  # type: ignore[attr-defined]
    assert "hunter2" not in wire and first_row(node) not in wire and "Traceback" not in wire, wire
    assert says in reply.message, reply.message  # type: ignore[attr-defined]
    error_id = re.search(r"error (E[0-9a-f]{8})", reply.message)  # type: ignore[attr-defined]
    assert error_id, reply.message  # type: ignore[attr-defined]
    logged = [line for line in node.log().splitlines() if error_id.group(1) in line]
    assert logged and "hunter2" in logged[0], logged


def test_an_exception_text_stays_in_the_node_log(node: OneNode) -> None:
    reply = node.round(VALUE_ERROR)
    assert_released_on_purpose(node, reply, "FS500", "training", "the plan raised ValueError")
    assert first_row(node) in node.log()  # the full text and its traceback, for the node's administrator
    assert "Traceback" in node.log()


def test_fedsilo_exception_types_raised_by_the_plan_are_not_released(node: OneNode) -> None:
    reply = node.round(FEDSILO_TYPE)
    assert_released_on_purpose(node, reply, "FS503", "training", "the plan raised NonFiniteError")


def test_a_class_named_after_the_secret_is_not_named(node: OneNode) -> None:
    reply = node.round(OWN_CLASS)
    assert_released_on_purpose(node, reply, "FS500", "training", "an exception of the plan's own")
    assert "Leak_" not in reply.message


def test_an_exception_while_the_plan_loads_is_not_released(node: OneNode) -> None:
    reply = node.round(AT_LOAD)
    assert_released_on_purpose(node, reply, "FS303", "plan_load", "the plan raised PlanSourceError")


def test_a_message_fedsilo_wrote_is_released(node: OneNode) -> None:
    reply = node.round(NOT_A_DATA_MANAGER)
    assert reply.kind == "error" and reply.code == "FS201", reply
    assert "training_data must return a DataManager, got list" in reply.message
    assert node.round(LOGREG_PLAN).kind == "train_reply"  # and the node goes on
