"""A researcher-side client for tests that hand-build messages (raw TrainRequests, malformed payloads).

`Experiment` only sends well-formed requests; tests of a node's defences need to send anything,
and to see every reply, so this client keeps what it has not been asked for yet.
"""

from __future__ import annotations

import contextlib
import queue
import time

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedsilo.common.serialization import params_to_bytes
from fedsilo.common.signing import sign_json
from fedsilo.network import topics
from fedsilo.network.credentials import Credentials
from fedsilo.network.filestore_client import BlobTransferError, FileStoreClient
from fedsilo.network.launcher import NetworkHandle
from fedsilo.network.messages import BlobRef, Message, PingRequest, ScalarMessage, TrainRequest
from fedsilo.network.messaging import Messaging


class RawResearcher:
    """MQTT + file-store client with a researcher's credentials. Brokers bind a client id to its party,
    so it must not share a party with an `Experiment` that runs meanwhile: use `for_network`, which
    gives it a researcher party of its own. It signs what it sends as a researcher does; `send_raw` and
    `send_forged` send unsigned or falsely signed bytes."""

    def __init__(self, creds: Credentials, timeout: float = 20.0) -> None:
        self.creds = creds
        self.party = creds.party
        self._inbox: queue.Queue[Message] = queue.Queue()
        self._kept: list[Message] = []  # received while waiting for something else
        self.scalars: list[ScalarMessage] = []  # training curves streamed by nodes, in arrival order
        self.messaging = Messaging.of(
            creds,
            on_message=self._receive,
            subscriptions=[topics.researcher_inbox(creds.party)],
            persistent=False,
        )
        self.messaging.start(timeout=timeout)
        self.files = FileStoreClient(creds.filestore)

    @classmethod
    def for_network(cls, network: NetworkHandle, party: str = "raw-researcher") -> RawResearcher:
        """A client with a researcher party of its own on `network` (registered on first use)."""
        if not network.credentials_path(party).is_file():
            network.add_party(party, "researcher")
        return cls(network.credentials(party))

    def _receive(self, msg: Message, topic: str) -> None:
        if isinstance(msg, ScalarMessage):
            self.scalars.append(msg)
        elif msg.kind not in ("log", "presence"):
            self._inbox.put(msg)

    def close(self) -> None:
        self.messaging.stop()
        self.files.close()

    # ------------------------------------------------------------------ sending
    def send(self, node_id: str, msg: Message) -> None:
        for ref in (getattr(msg, "plan", None), getattr(msg, "params", None)):
            if isinstance(ref, BlobRef):  # the file store lets a node read only the blobs granted to it
                with contextlib.suppress(BlobTransferError):  # a test may name a blob that does not exist
                    self.files.ensure_readers(ref, [node_id])
        self.messaging.publish(topics.node(node_id, self.party), msg).wait_for_publish(10)

    def send_raw(self, node_id: str, payload: bytes, sign: bool | None = None) -> None:
        """`payload` as it is, or signed; `sign=None`: signed when it can be (a JSON object's bytes), so that
        junk shaped like a message reaches the node's parser and other junk its signature check."""
        if sign is None:
            sign = payload[:1] == b"{" and payload[-1:] == b"}" and len(payload) > 2
        self.messaging.publish_raw(topics.node(node_id, self.party), payload, sign=sign).wait_for_publish(10)

    def send_forged(self, node_id: str, msg: Message, signer: str, key: Ed25519PrivateKey) -> None:
        """`msg` published with this client's credentials but signed as `signer` with `key` (a forgery)."""
        wire = sign_json(msg.to_json(), signer, key)
        self.messaging.publish_raw(topics.node(node_id, self.party), wire, sign=False).wait_for_publish(10)

    # ------------------------------------------------------------------ receiving
    def wait(self, request_id: str, kinds: tuple[str, ...], timeout: float = 120.0) -> Message:
        """The first message answering `request_id` with one of `kinds`; raises TimeoutError."""

        def matches(msg: Message) -> bool:
            return getattr(msg, "in_reply_to", None) == request_id and msg.kind in kinds

        for msg in self._kept:
            if matches(msg):
                self._kept.remove(msg)
                return msg
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                msg = self._inbox.get(timeout=max(remaining, 0.01))
            except queue.Empty:
                raise TimeoutError(f"no {'/'.join(kinds)} for request {request_id} within {timeout:g}s") from None
            if matches(msg):
                return msg
            self._kept.append(msg)

    def received(self, request_id: str) -> list[Message]:
        """Replies to `request_id` that arrived so far and were not yet taken by `wait`."""
        while True:
            try:
                self._kept.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        return [m for m in self._kept if getattr(m, "in_reply_to", None) == request_id]

    def ask(self, node_id: str, msg: Message, kinds: tuple[str, ...], timeout: float = 120.0) -> Message:
        self.send(node_id, msg)
        return self.wait(msg.request_id, kinds, timeout)

    def ping(self, node_id: str, timeout: float = 30.0) -> Message:
        return self.ask(node_id, PingRequest(sender=self.party), ("ping_reply",), timeout)

    # ------------------------------------------------------------------ building requests
    def train_request(
        self,
        plan_source: str,
        plan_name: str,
        dataset_id: str,
        params: dict[str, torch.Tensor] | None = None,
        params_ref: BlobRef | None = None,
        job_id: str = "job1",
        model_args: dict | None = None,
        **training_args: object,
    ) -> TrainRequest:
        """A TrainRequest with the plan (and parameters, unless `params_ref` is given) uploaded."""
        plan_ref = self.files.upload_bytes(plan_source.encode(), digest="sha256")  # a plan by its approved hash
        if params_ref is None:
            assert params is not None, "give params or params_ref"
            params_ref = self.files.upload_bytes(params_to_bytes(params))
        return TrainRequest(
            sender=self.party,
            job_id=job_id,
            round=1,
            dataset_id=dataset_id,
            plan=plan_ref,
            plan_name=plan_name,
            blobs={"params": params_ref},
            training_args={"epochs": 2, "batch_size": 16, "log_interval": 2, **training_args},
            model_args=dict(model_args or {}),
        )
