"""End to end: a plan approved in the GUI trains on the node at the next round; a rejected one is refused."""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from playwright.sync_api import expect

from fedsilo.common.errors import ErrorCode
from fedsilo.common.serialization import params_from_bytes, params_to_bytes
from fedsilo.network import topics
from fedsilo.network.credentials import Credentials
from fedsilo.network.filestore_client import FileStoreClient
from fedsilo.network.messages import ApprovalRequest, Message, PingRequest, TrainRequest
from fedsilo.network.messaging import Messaging
from fedsilo.node.datasets import DatasetStore
from fedsilo.node.plans import PlanStore
from tests.support.procs import FEDSILO, start_network, start_process, stop_process

from .helpers import PLAN_V1, PLAN_V2, flashes, init_node, login, make_data, new_context, start_gui

pytestmark = pytest.mark.browser

NODE = "gui-e2e-node"


class Publisher:
    """A minimal researcher: publishes requests with the researcher's credentials and collects replies."""

    def __init__(self, creds: Credentials) -> None:
        self.creds = creds
        self.inbox: queue.Queue[Message] = queue.Queue()
        self.messaging = Messaging.of(  # nodes run signed requests only
            creds,
            on_message=lambda msg, topic: self.inbox.put(msg),
            subscriptions=[topics.researcher_inbox(creds.party)],
            persistent=False,
        )
        self.messaging.start(timeout=20)
        self.files = FileStoreClient(creds.filestore)

    def ask(self, msg: Message, kinds: tuple[str, ...], timeout: float = 180) -> Message:
        self.messaging.publish(topics.node(NODE, self.creds.party), msg).wait_for_publish(10)
        deadline = time.monotonic() + timeout
        while True:
            reply = self.inbox.get(timeout=max(deadline - time.monotonic(), 0.01))
            if getattr(reply, "in_reply_to", None) == msg.request_id and reply.kind in kinds:
                return reply

    def submit(self, source: str, name: str) -> str:
        ref = self.files.upload_bytes(source.encode(), readers=[NODE], digest="sha256")  # a plan by its sha256
        req = ApprovalRequest(sender=self.creds.party, plan=ref, plan_name=name, description="for the GUI test")
        reply = self.ask(req, ("approval_reply",))
        assert reply.status == "pending"
        return reply.plan_sha256

    def train(self, source: str, name: str, dataset_id: str) -> Message:
        params = {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}
        req = TrainRequest(
            sender=self.creds.party, job_id="gui-job", round=1, dataset_id=dataset_id,
            plan=self.files.upload_bytes(source.encode(), readers=[NODE], digest="sha256"), plan_name=name,
            blobs={"params": self.files.upload_bytes(params_to_bytes(params), readers=[NODE])},
            training_args={"epochs": 1, "batch_size": 16},
        )  # fmt: skip
        return self.ask(req, ("train_reply", "error"))

    def stop(self) -> None:
        self.messaging.stop()


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("gui-e2e")
    net = start_network(root)
    procs = []
    publisher = None
    try:
        data, _ = make_data(root)
        nodedir = root / "node"
        init_node(nodedir, NODE, net.netdir, data)
        dataset = DatasetStore(nodedir).add("heart", ["heart"], "csv", data / "cardio" / "heart.csv", added_by="test")
        status = nodedir / "status.json"

        def connected() -> bool:
            try:
                return bool(json.loads(status.read_text()).get("broker_connected"))
            except (OSError, ValueError):
                return False

        procs.append(start_process([*FEDSILO, "node", "start", "--dir", str(nodedir)], root / "node.log",
                                   ready=connected, timeout=120))  # fmt: skip
        gui = start_gui(nodedir, root / "gui.log")
        procs.append(gui.proc)
        publisher = Publisher(net.credentials("researcher"))
        publisher.ask(PingRequest(sender=publisher.creds.party), ("ping_reply",), timeout=60)
        yield {"dir": nodedir, "gui": gui, "publisher": publisher, "dataset": dataset}
    finally:
        if publisher is not None:
            publisher.stop()
        for proc in reversed(procs):
            stop_process(proc)
        net.stop()


def test_gui_decision_governs_the_next_round(browser, platform: dict[str, Any], screenshots: Path) -> None:
    publisher: Publisher = platform["publisher"]
    good = publisher.submit(PLAN_V1, "HeartPlan")
    bad = publisher.submit(PLAN_V2, "HeartPlan")
    plans = PlanStore(platform["dir"])
    assert plans.status(good) == plans.status(bad) == "pending"

    # Before any decision the node refuses the plan and names its hash.
    refused = publisher.train(PLAN_V1, "HeartPlan", platform["dataset"]["dataset_id"])
    assert refused.kind == "error"
    assert refused.code == ErrorCode.PLAN_NOT_APPROVED
    assert good in refused.message

    url = platform["gui"].url
    context = new_context(browser, url)
    try:
        page = context.new_page()
        login(page, url, "alice")
        page.goto("/status/")
        expect(page.locator("#daemon-state")).to_have_text("online")
        expect(page.locator("#sandbox-state")).to_have_text("bwrap: active")  # plan code runs in bubblewrap
        expect(page.get_by_text("connected", exact=True)).to_be_visible()
        page.screenshot(path=screenshots / "status-online.png", full_page=True)

        page.goto("/plans")
        page.get_by_role("link", name=good[:12]).click()
        page.get_by_label("Why approve?").fill("Reviewed with the cardiology team.")
        page.get_by_role("button", name="Approve this plan").click()
        assert any("approved: it runs at the next round" in f for f in flashes(page))

        page.goto("/plans")
        page.get_by_role("link", name=bad[:12]).click()
        page.get_by_label("Why reject?").fill("The larger model was not agreed in the protocol.")
        page.get_by_role("button", name="Reject this plan").click()
        assert any("rejected" in f for f in flashes(page))
    finally:
        context.close()

    reply = publisher.train(PLAN_V1, "HeartPlan", platform["dataset"]["dataset_id"])
    assert reply.kind == "train_reply", reply
    assert reply.sample_size > 0
    params = params_from_bytes(publisher.files.download_bytes(reply.params))
    assert params["weight"].abs().sum() > 0  # it really trained

    refused = publisher.train(PLAN_V2, "HeartPlan", platform["dataset"]["dataset_id"])
    assert refused.kind == "error"
    assert refused.code == ErrorCode.PLAN_REJECTED
