"""The researcher's round downloads updates while it waits for the other nodes (issue 11), against a real
network (broker, the file store under uvicorn with TLS) and nodes with real credentials that answer as the test
crafts (`FakeNode`): a download held back on the wire does not stop another node's update from being folded
in, the deadline holds while a download hangs, and hostile replies (wrong or huge sizes, blobs the researcher
may not read, garbage, a second reply, another node's blob) drop only their node, with the reason.

A download is held back by a TCP relay between the researcher's download threads and the store (`Relay`): TLS
passes through it untouched, and it stops forwarding the first response that passes a byte count."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import torch

from fedsilo.common.config import Timeouts
from fedsilo.common.serialization import params_to_bytes
from fedsilo.common.training_args import TrainingArgs
from fedsilo.network import topics
from fedsilo.network.filestore_client import FileStoreClient
from fedsilo.network.messages import BlobRef, DatasetInfo, Message, TaskAck, TrainReply, TrainRequest
from fedsilo.researcher.algorithms.base import NodeUpdate
from fedsilo.researcher.algorithms.fedavg import FedAverage
from fedsilo.researcher.history import RoundRecord
from fedsilo.researcher.monitor import Monitor
from fedsilo.researcher.requests import Requests
from fedsilo.researcher.round import RoundContext, TrainingRound
from fedsilo.researcher.strategies import DefaultStrategy
from tests.support.fake_node import FakeNode
from tests.support.procs import NetworkHandle, start_network

ROWS = 100
SHAPE = (256, 2048)  # 2 MiB of float32: the relay holds a download back in the middle of its body
HOLD_AFTER = 512 << 10
WAIT = 60.0  # a bound on waits that end at once when the code works; reaching it fails the test
TIMEOUTS = Timeouts(transfer=300.0, round=600.0)  # a hung read would hold a thread 300 s without the round's bound
GLOBAL = {"weight": torch.zeros(SHAPE), "bias": torch.zeros(2)}


def update(fill: float) -> dict[str, torch.Tensor]:
    return {"weight": torch.full(SHAPE, fill), "bias": torch.full((2,), fill)}


# ---------------------------------------------------------------------- the wire
class Relay:
    """TCP relay to the file store. The first connection whose server->client bytes pass `HOLD_AFTER` is held
    (its next bytes are not forwarded) until `release` is set: a download stalled in the middle of its body.
    With `cut`, that connection is closed instead: the store went away in the middle of a download."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.cut = False
        self.held, self.release = threading.Event(), threading.Event()
        self._holder: socket.socket | None = None
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self._server.close()
        for s in self._sockets:
            _shut(s)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, downstream: bool) -> None:
        forwarded = 0
        try:
            while data := src.recv(1 << 16):
                forwarded += len(data)
                if downstream and forwarded > HOLD_AFTER and self._hold(src):
                    self.held.set()
                    if self.cut:
                        _shut(src)
                        return
                    self.release.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _shut(dst)

    def _hold(self, conn: socket.socket) -> bool:
        with self._lock:
            if self._holder is None:
                self._holder = conn
            return self._holder is conn and not self.release.is_set()


def _shut(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)


# ---------------------------------------------------------------------- nodes
class Node(FakeNode):
    """A node with valid credentials whose train replies `answer(request, researcher)` builds (and may upload)."""

    def __init__(self, net: NetworkHandle, name: str, answer: Callable[[Node, TrainRequest, str], list[TrainReply]]):
        info = DatasetInfo(dataset_id=f"ds-{name}", name=name, tags=["fetch"], data_type="csv", shape=[ROWS, 3])
        super().__init__(net, name, info, craft=lambda request: (b"", 0))
        self.answer = answer

    def _handle(self, msg: Message, topic: str) -> None:
        researcher = topics.publisher(topic)
        if not isinstance(msg, TrainRequest) or not researcher:
            super()._handle(msg, topic)
            return
        if msg.request_id in self._seen:
            return
        self._seen.add(msg.request_id)
        self.messaging.publish(topics.researcher(researcher, self.name), TaskAck(**self.base(msg), job_id=msg.job_id,
                                                                               round=msg.round))  # fmt: skip
        for reply in self.answer(self, msg, researcher):
            self.messaging.publish(topics.researcher(researcher, self.name), reply)

    def base(self, msg: Message) -> dict[str, Any]:
        return {"sender": self.name, "node_id": self.name, "node_name": self.name, "in_reply_to": msg.request_id}

    def reply(self, msg: TrainRequest, ref: BlobRef, samples: int = ROWS) -> TrainReply:
        return TrainReply(**self.base(msg), job_id=msg.job_id, round=msg.round, dataset_id=msg.dataset_id,
                          blobs={"params": ref}, sample_size=samples, metrics={"loss": 0.5})  # fmt: skip


def sends(params: dict[str, torch.Tensor], samples: int = ROWS, before: Callable[[], object] = lambda: None) -> Any:
    """An honest answer: `params` uploaded for the researcher, one reply (after `before()` returned)."""

    def answer(node: Node, msg: TrainRequest, researcher: str) -> list[TrainReply]:
        before()
        return [node.reply(msg, node.files.upload_bytes(params_to_bytes(params), readers=[researcher]), samples)]

    return answer


# ---------------------------------------------------------------------- the researcher's side
class Recording(FedAverage):
    """FedAverage that records the order updates are folded in, and calls `on_add(node)` after each."""

    def __init__(self, on_add: Callable[[str], object] = lambda node: None) -> None:
        super().__init__()
        self.added: list[str] = []
        self.on_add = on_add

    def add(self, update: NodeUpdate) -> None:
        super().add(update)
        self.added.append(update.node_id)
        self.on_add(update.node_id)


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetworkHandle]:
    handle = start_network(tmp_path_factory.mktemp("fetch"))
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def requests_(net: NetworkHandle) -> Iterator[Requests]:
    req = Requests(net.credentials("researcher"), TIMEOUTS)
    req.start()
    yield req
    req.close()


@pytest.fixture(scope="module")
def files(net: NetworkHandle) -> Iterator[FileStoreClient]:
    client = FileStoreClient(net.credentials("researcher").filestore, TIMEOUTS)
    yield client
    client.close()


@pytest.fixture
def relay(net: NetworkHandle) -> Iterator[Relay]:
    url = urlsplit(net.credentials("researcher").filestore.url)
    proxy = Relay((url.hostname or "127.0.0.1", url.port or 443))
    yield proxy
    proxy.close()


@pytest.fixture
def nodes(net: NetworkHandle) -> Iterator[dict[str, Node]]:
    made: dict[str, Node] = {}
    yield made
    for node in made.values():
        node.close()


def start(net: NetworkHandle, made: dict[str, Node], tag: str, answers: dict[str, Any]) -> list[str]:
    """Nodes named `<tag>-<key>` (new names in each test: no presence or replies left over from another)."""
    for key, answer in answers.items():
        made[f"{tag}-{key}"] = Node(net, f"{tag}-{key}", answer)
    return [f"{tag}-{key}" for key in answers]


def run_round(
    files: FileStoreClient, req: Requests, made: dict[str, Node], algorithm: FedAverage, timeout: float = 120.0,
    relay: Relay | None = None,
) -> tuple[TrainingRound, RoundRecord, dict[str, torch.Tensor]]:  # fmt: skip
    clients = None
    if relay is not None:  # the round's download threads reach the store through the relay
        settings = req.credentials.filestore
        host = urlsplit(settings.url).hostname
        settings = settings.model_copy(update={"url": f"https://{host}:{relay.port}", "tls": settings.tls})

        def clients(read_timeout: float) -> FileStoreClient:
            return FileStoreClient(settings, TIMEOUTS.model_copy(update={"transfer": read_timeout}))

    ctx = RoundContext(
        job_id="fetch-job", requests=req, files=files, algorithm=algorithm, strategy=DefaultStrategy(),
        training_data={name: node.dataset for name, node in made.items()},
        plan=files.upload_bytes(b"# plan\n", digest="sha256"), plan_name="Plan", model_args={},
        training_args=TrainingArgs.parse({}),
        global_params=GLOBAL, timeout=timeout, monitor=Monitor(), readers=list(made), download_client=clients,
    )  # fmt: skip
    training = TrainingRound(ctx, round_index=0)
    record, params = training.run()
    return training, record, params


def dropped(record: RoundRecord) -> dict[str, tuple[str, str]]:
    return {n: (r.dropped.kind, r.dropped.reason) for n, r in record.nodes.items() if r.dropped is not None}


# ---------------------------------------------------------------------- tests
def test_a_held_back_download_does_not_stop_another_update_being_folded_in(
    net: NetworkHandle, requests_: Requests, files: FileStoreClient, relay: Relay, nodes: dict[str, Node]
) -> None:
    # "slow" replies at once; its download is held on the wire. "quick" replies only once that is so. Serial
    # downloads would sit in slow's until its read timed out; here quick's is folded in, which releases slow.
    slow, quick = start(net, nodes, "overlap", {
        "slow": sends(update(1.0), samples=10),
        "quick": sends(update(3.0), samples=30, before=lambda: relay.held.wait(WAIT)),
    })  # fmt: skip
    algorithm = Recording(on_add=lambda node: relay.release.set() if node == quick else None)
    _, record, params = run_round(files, requests_, nodes, algorithm, relay=relay)
    assert relay.held.is_set(), "the relay never held a download"
    assert dropped(record) == {}
    assert algorithm.added == [quick, slow]
    assert torch.equal(params["weight"], torch.full(SHAPE, 2.5))  # (10 x 1 + 30 x 3) / 40: both, weighed
    assert record.nodes[slow].timings["researcher_s"] > record.nodes[quick].timings["researcher_s"]
    assert record.stats["bytes_up"] == 2 * len(params_to_bytes(update(1.0)))
    assert record.stats["fetch_s"] > 0


def test_the_deadline_holds_while_a_download_hangs(
    net: NetworkHandle, requests_: Requests, files: FileStoreClient, relay: Relay, nodes: dict[str, Node]
) -> None:
    stuck, fine = start(net, nodes, "hang", {
        "stuck": sends(update(1.0)),
        "fine": sends(update(2.0), before=lambda: relay.held.wait(WAIT)),
    })  # fmt: skip
    training, record, params = run_round(files, requests_, nodes, Recording(), timeout=8.0, relay=relay)
    assert relay.held.is_set() and not relay.release.is_set()  # stuck's download never ended
    kind, reason = dropped(record)[stuck]
    assert kind == "timeout" and "still downloading at the round's deadline" in reason
    assert record.nodes[fine].dropped is None
    assert torch.equal(params["weight"], torch.full(SHAPE, 2.0))
    # The stuck download's thread ends on its own: its read timeout was bounded by the time the round had
    # left (8 s), not the transfer timeout (300 s); WAIT lies between the two.
    assert training._fetcher is not None
    for thread in training._fetcher.threads():
        thread.join(WAIT)
    assert training._fetcher.threads() == []


def test_a_download_cut_off_mid_body_drops_only_its_node(
    net: NetworkHandle, requests_: Requests, files: FileStoreClient, relay: Relay, nodes: dict[str, Node]
) -> None:
    relay.cut = True
    cut, fine = start(net, nodes, "cut", {
        "first": sends(update(1.0)),
        "then": sends(update(2.0), before=lambda: relay.held.wait(WAIT)),
    })  # fmt: skip
    _, record, params = run_round(files, requests_, nodes, Recording(), relay=relay)
    assert relay.held.is_set()
    kind, reason = dropped(record)[cut]
    size = len(params_to_bytes(update(1.0)))
    assert kind == "invalid" and "unusable update" in reason and f"bytes, expected {size}" in reason, reason
    assert record.nodes[fine].dropped is None
    assert torch.equal(params["weight"], torch.full(SHAPE, 2.0))


def test_hostile_replies_drop_only_their_node_with_the_reason(
    net: NetworkHandle, requests_: Requests, files: FileStoreClient, nodes: dict[str, Node]
) -> None:
    honest_bytes = params_to_bytes(update(2.0))
    honest_ref: dict[str, BlobRef] = {}
    uploaded = threading.Event()

    def honest(node: Node, msg: TrainRequest, researcher: str) -> list[TrainReply]:
        honest_ref["ref"] = node.files.upload_bytes(honest_bytes, readers=[researcher])
        uploaded.set()
        return [node.reply(msg, honest_ref["ref"])]

    def own(fill: float, size: Callable[[int], int] = lambda n: n, readers: bool = True) -> Any:
        def answer(node: Node, msg: TrainRequest, researcher: str) -> list[TrainReply]:
            ref = node.files.upload_bytes(params_to_bytes(update(fill)), readers=[researcher] if readers else [])
            return [node.reply(msg, ref.model_copy(update={"size": size(ref.size)}))]

        return answer

    def garbage(node: Node, msg: TrainRequest, researcher: str) -> list[TrainReply]:
        return [node.reply(msg, node.files.upload_bytes(b"\x00" * 4096 + b"not safetensors", readers=[researcher]))]

    def twice(node: Node, msg: TrainRequest, researcher: str) -> list[TrainReply]:
        # Its first reply counts; the second, with another update, comes while the first is downloading.
        first = node.files.upload_bytes(params_to_bytes(update(4.0)), readers=[researcher])
        second = node.files.upload_bytes(params_to_bytes(update(1000.0)), readers=[researcher])
        return [node.reply(msg, first), node.reply(msg, second).model_copy(update={"request_id": "again"})]

    def copycat(node: Node, msg: TrainRequest, researcher: str) -> list[TrainReply]:
        # Names the honest node's blob. Content addressing makes this the same as uploading those bytes, which a
        # node can do only with the other node's help (replies reach the researcher alone): it is folded in.
        assert uploaded.wait(WAIT)
        return [node.reply(msg, honest_ref["ref"], samples=50)]

    names = start(net, nodes, "hostile", {
        "honest": honest,
        "twice": twice,
        "copycat": copycat,
        "wrong-size": own(5.0, size=lambda n: n + 1),
        "huge-size": own(6.0, size=lambda n: 10**13),
        "unreadable": own(7.0, readers=False),  # a blob the researcher was not granted
        "garbage": garbage,
    })  # fmt: skip
    _, record, params = run_round(files, requests_, nodes, Recording())
    drops = dropped(record)
    assert set(drops) == {n for n in names if n.split("-", 1)[1] in ("wrong-size", "huge-size", "unreadable",
                                                                      "garbage")}  # fmt: skip
    assert all(kind == "invalid" for kind, _ in drops.values()), drops
    assert "the reference names" in drops["hostile-wrong-size"][1], drops
    assert "over the allowed" in drops["hostile-huge-size"][1], drops
    assert "HTTP 404" in drops["hostile-unreadable"][1], drops
    assert "unusable update" in drops["hostile-garbage"][1], drops
    # honest (100 x 2), twice's first reply (100 x 4), copycat (50 x 2): (200 + 400 + 100) / 250
    assert torch.allclose(params["weight"], torch.full(SHAPE, 700 / 250))
    assert record.nodes["hostile-twice"].sample_size == ROWS
