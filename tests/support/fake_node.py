"""A node party that is not a fedsilo daemon: real node credentials, a real MQTT connection and a real
file store client, answering requests with whatever a test crafts (a hostile party with valid credentials).

    rogue = FakeNode(network, "rogue", DatasetInfo(...), craft=lambda request: (payload_bytes, sample_size))
    ...   # an Experiment finds it by tags, sends it a TrainRequest, gets the crafted TrainReply
    rogue.close()
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from fedsilo.common import __version__
from fedsilo.network import topics
from fedsilo.network.filestore_client import FileStoreClient
from fedsilo.network.launcher import NetworkHandle
from fedsilo.network.messages import (
    ApprovalReply,
    ApprovalRequest,
    DatasetInfo,
    Message,
    PingReply,
    PingRequest,
    PlanStatusReply,
    PlanStatusRequest,
    Presence,
    SearchReply,
    SearchRequest,
    TaskAck,
    TrainReply,
    TrainRequest,
)
from fedsilo.network.messaging import Messaging

Craft = Callable[[TrainRequest], tuple[bytes, int]]
"""A TrainRequest -> (the bytes uploaded as the update, the sample count claimed)."""


class FakeNode:
    """Answers search, ping, approval and plan-status requests like an approving node, and every train
    request with a TaskAck and a TrainReply built from `craft` (changeable between rounds)."""

    def __init__(self, network: NetworkHandle, name: str, dataset: DatasetInfo, craft: Craft) -> None:
        self.name, self.dataset, self.craft = name, dataset, craft
        if not network.credentials_path(name).is_file():
            network.add_party(name, "node")
        creds = network.credentials(name)
        self.files = FileStoreClient(creds.filestore)
        self._seen: set[str] = set()  # the researcher re-sends unanswered requests; answer each once
        self._work = ThreadPoolExecutor(1)  # handlers run on paho's thread: uploads happen here instead
        self.messaging = Messaging.of(  # signed: researchers take replies a roster node signed, only
            creds,
            on_message=lambda msg, topic: self._work.submit(self._handle, msg, topic),
            subscriptions=[topics.BROADCAST_ALL, topics.node_inbox(name)],
            will=(topics.presence(name), self._presence(False)),
            persistent=False,
        )
        self.messaging.start(timeout=20)
        self.messaging.publish(topics.presence(name), self._presence(True), retain=True).wait_for_publish(10)

    def close(self) -> None:
        self.messaging.stop(farewell=(topics.presence(self.name), self._presence(False)))
        self._work.shutdown(wait=True)
        self.files.close()

    def _presence(self, online: bool) -> Presence:
        return Presence(sender=self.name, node_id=self.name, node_name=self.name, online=online, version=__version__)

    def _handle(self, msg: Message, topic: str) -> None:
        researcher = topics.publisher(topic)
        if not researcher or msg.request_id in self._seen:
            return
        self._seen.add(msg.request_id)
        base = {"sender": self.name, "node_id": self.name, "node_name": self.name, "in_reply_to": msg.request_id}
        replies: list[Message] = []
        if isinstance(msg, SearchRequest):
            found = [self.dataset] if set(msg.tags) <= set(self.dataset.tags) else []
            replies.append(SearchReply(**base, datasets=found))
        elif isinstance(msg, PingRequest):
            replies.append(PingReply(**base, version=__version__))
        elif isinstance(msg, ApprovalRequest):
            replies.append(ApprovalReply(**base, plan_sha256=msg.plan.sha256, status="approved"))
        elif isinstance(msg, PlanStatusRequest):
            replies.append(PlanStatusReply(**base, plan_sha256=msg.plan_sha256, status="approved",
                                           approval_required=True))  # fmt: skip
        elif isinstance(msg, TrainRequest):
            self.messaging.publish(topics.researcher(researcher, self.name),
                                   TaskAck(**base, job_id=msg.job_id, round=msg.round))  # fmt: skip
            payload, samples = self.craft(msg)
            ref = self.files.upload_bytes(payload, readers=[researcher])
            replies.append(TrainReply(**base, job_id=msg.job_id, round=msg.round, dataset_id=msg.dataset_id,
                                      blobs={"params": ref}, sample_size=samples, metrics={"loss": 0.5}))  # fmt: skip
        for reply in replies:
            self.messaging.publish(topics.researcher(researcher, self.name), reply)
