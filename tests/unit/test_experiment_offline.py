"""Experiment's round policy and breakpoints, with in-process fakes for the broker and file store."""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

from fedsilo.common.config import Timeouts
from fedsilo.common.errors import RemoteError
from fedsilo.common.hashing import BLOB_DIGEST, digest_bytes
from fedsilo.common.serialization import params_from_bytes, params_to_bytes
from fedsilo.common.training_plan import DataManager, TorchTrainingPlan
from fedsilo.network.credentials import Credentials, FileStoreSettings, MqttSettings
from fedsilo.network.messages import (
    BlobRef,
    DatasetInfo,
    ErrorReply,
    Message,
    Presence,
    ScalarMessage,
    TaskAck,
    TrainReply,
    TrainRequest,
)
from fedsilo.researcher import Experiment, RoundFailed
from fedsilo.researcher.requests import NodeState, Waiter


class TinyPlan(TorchTrainingPlan):
    def init_model(self, model_args):
        return nn.Linear(model_args["n"], 1)

    def training_data(self, batch_size):
        return DataManager(torch.utils.data.TensorDataset(torch.zeros(4, 2), torch.zeros(4)), batch_size=batch_size)

    def training_step(self, data, target):
        return ((self.model()(data).squeeze(1) - target) ** 2).mean()


class FakeStore:
    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.uploads = 0
        self.released: list[BlobRef] = []

    def upload_bytes(self, data: bytes, readers: object = (), hold: bool = False, digest: str = BLOB_DIGEST) -> BlobRef:
        self.uploads += 1
        data = data if isinstance(data, bytes) else data.tobytes()  # the researcher sends SerializedParams
        ref = BlobRef.named(digest, digest_bytes(data, digest), len(data))  # type: ignore[arg-type]
        self.blobs[ref.key] = data
        return ref

    def ensure_readers(self, ref: BlobRef, readers: object) -> BlobRef:
        return ref

    def download_bytes(self, ref: BlobRef, max_bytes: int | None = None) -> bytes:
        return ref.data if ref.data is not None else self.blobs[ref.key]  # as FileStoreClient: inline first

    def download_buffer(self, ref: BlobRef, max_bytes: int | None = None, pool: object = None) -> bytearray:
        return bytearray(self.download_bytes(ref))

    def release_all(self, refs: Iterable[BlobRef]) -> None:
        self.released.extend(r for r in refs if r.data is None)  # as FileStoreClient: inline refs never stored


Behaviour = Callable[[TrainRequest, "queue.Queue[Message]"], None]


class FakeRequests:
    party = "researcher"
    timeouts = Timeouts()

    def __init__(self, behaviours: dict[str, Behaviour], online: dict[str, bool] | None = None) -> None:
        self.credentials = creds()  # the download threads' clients are made from them (none here: small updates)
        self.behaviours = behaviours
        self.online = online or {n: True for n in behaviours}
        self.current: Waiter | None = None
        self.sent: list[TrainRequest] = []

    def nodes(self) -> dict[str, NodeState]:
        return {n: NodeState(n, n, o) for n, o in self.online.items()}

    @contextmanager
    def waiter(self, keys=(), job_id=None, watch_presence=False) -> Iterator[Waiter]:
        self.current = Waiter(keys, job_id, watch_presence)
        try:
            yield self.current
        finally:
            self.current = None

    def send(self, waiter: Waiter, node: str, msg: TrainRequest) -> None:
        assert self.current is waiter
        self.sent.append(msg)
        self.behaviours[node](msg, waiter.queue)

    def node_name(self, node: str) -> str:
        return node

    def online_nodes(self, wait: bool = True) -> list[str]:
        return sorted(n for n, o in self.online.items() if o)

    def close(self) -> None:
        pass


def trainer(store: FakeStore, node: str, delta: float, samples: int) -> Behaviour:
    """A node that adds `delta` to every parameter and reports `samples`."""

    def behave(req: TrainRequest, q: queue.Queue) -> None:
        params = params_from_bytes(store.download_bytes(req.params))
        ref = store.upload_bytes(params_to_bytes({k: v + delta for k, v in params.items()}))
        common = {"sender": node, "node_id": node, "in_reply_to": req.request_id}
        q.put(TaskAck(**common, job_id=req.job_id, round=req.round))
        q.put(
            ScalarMessage(
                sender=node,
                node_id=node,
                job_id=req.job_id,
                round=req.round,
                dataset_id="d",
                key="loss",
                value=1.0 / (req.round + 1),
                step=1,
            )
        )
        q.put(
            TrainReply(
                **common,
                job_id=req.job_id,
                round=req.round,
                dataset_id=req.dataset_id,
                blobs={"params": ref},
                sample_size=samples,
                timings={"total_s": 0.01},
                metrics={"loss": 1.0 / (req.round + 1)},
            )
        )

    return behave


def failer(node: str, message: str) -> Behaviour:
    def behave(req: TrainRequest, q: queue.Queue) -> None:
        q.put(
            ErrorReply(
                sender=node,
                node_id=node,
                in_reply_to=req.request_id,
                code="FS300",
                message=message,
                stage="approval",
                job_id=req.job_id,
                round=req.round,
            )
        )

    return behave


def silent(req: TrainRequest, q: queue.Queue) -> None:
    pass


def creds() -> Credentials:
    return Credentials(
        party="researcher",
        role="researcher",
        mqtt=MqttSettings(username="researcher", password="x"),
        filestore=FileStoreSettings(url="http://127.0.0.1:9", token="t"),
    )


def make(tmp_path: Path, behaviours: dict[str, Behaviour], store: FakeStore, **kw) -> Experiment:
    data = {  # shape: the sample count a node reports, the bound on the weight it may claim
        n: DatasetInfo(dataset_id=f"ds-{n}", name=f"data-{n}", tags=["t"], data_type="csv", shape=[100, 2])
        for n in behaviours
    }
    exp = Experiment(
        tags=["t"],
        training_plan_class=TinyPlan,
        model_args={"n": 2},
        training_data=data,
        round_limit=kw.pop("round_limit", 3),
        network=creds(),
        experimentation_folder=tmp_path,
        **kw,
    )
    exp._requests = FakeRequests(behaviours, kw.get("online"))  # type: ignore[assignment]
    exp._filestore = store  # type: ignore[assignment]
    return exp


def test_round_aggregates_weighted_and_records_replies(tmp_path: Path) -> None:
    store = FakeStore()
    exp = make(tmp_path, {"a": trainer(store, "a", 1.0, 10), "b": trainer(store, "b", 3.0, 30)}, store)
    before = exp.training_plan().get_parameters()
    assert exp.run_once() == 1
    after = exp.aggregated_params()[0]["params"]
    for k in before:
        assert torch.allclose(after[k], before[k] + 2.5)  # (1*10 + 3*30) / 40
    assert torch.equal(exp.training_plan().get_parameters()["weight"], after["weight"])
    replies = exp.training_replies()[0]
    assert replies["a"]["sample_size"] == 10 and replies["b"]["dropped"] is None
    assert "researcher_s" in replies["a"]["timings"] and "ack_s" in replies["a"]
    assert exp.round_current() == 1
    table_text = exp.metrics_table()
    assert "round" in table_text.splitlines()[0] and table_text.count(" ok ") == 2
    uploads = store.uploads
    exp.run_once()
    assert store.uploads == uploads + 2  # two node updates: the global params go inline, the plan is not re-sent
    assert len({m.plan.sha256 for m in exp._requests.sent}) == 1


def test_errors_and_silence_are_dropped_and_the_round_completes(tmp_path: Path) -> None:
    store = FakeStore()
    exp = make(
        tmp_path,
        {"a": trainer(store, "a", 1.0, 10), "b": failer("b", "plan 1234abcd not approved"), "c": silent},
        store,
        round_timeout=0.2,
    )
    exp.run_once()
    replies = exp.training_replies()[0]
    assert replies["a"]["dropped"] is None
    assert replies["b"]["dropped"]["kind"] == "error" and "1234abcd" in replies["b"]["dropped"]["reason"]
    assert replies["c"]["dropped"]["kind"] == "timeout"
    assert "dropped" in exp.metrics_table()


def test_offline_during_round_is_dropped(tmp_path: Path) -> None:
    store = FakeStore()

    def goes_offline(req: TrainRequest, q: queue.Queue) -> None:
        q.put(Presence(sender="b", node_id="b", online=False))

    exp = make(tmp_path, {"a": trainer(store, "a", 1.0, 10), "b": goes_offline}, store, round_timeout=30)
    exp.run_once()
    assert exp.training_replies()[0]["b"]["dropped"]["kind"] == "offline"


def test_every_node_failing_raises_and_leaves_state_unchanged(tmp_path: Path) -> None:
    store = FakeStore()
    exp = make(tmp_path, {"a": failer("a", "plan 1234abcd not approved"), "b": silent}, store, round_timeout=0.1)
    with pytest.raises(RoundFailed, match="1234abcd"):
        exp.run_once()
    exp._requests.behaviours["b"] = failer("b", "plan 1234abcd not approved")  # type: ignore[union-attr]
    with pytest.raises(RemoteError, match=r"node 'a'.*1234abcd"):
        exp.run_once()
    assert exp.round_current() == 0 and exp.training_replies() == {}


def test_keyboard_interrupt_cancels_the_round_cleanly(tmp_path: Path) -> None:
    store = FakeStore()
    good = trainer(store, "a", 1.0, 10)

    def interrupt(req: TrainRequest, q: queue.Queue) -> None:
        raise KeyboardInterrupt

    exp = make(tmp_path, {"a": interrupt}, store)
    with pytest.raises(KeyboardInterrupt):
        exp.run_once()
    assert exp.round_current() == 0
    exp._requests.behaviours["a"] = good  # type: ignore[union-attr]
    assert exp.run_once() == 1 and exp.round_current() == 1


def test_breakpoint_round_trip_resumes_rounds(tmp_path: Path) -> None:
    store = FakeStore()
    behaviours = {"a": trainer(store, "a", 1.0, 10), "b": trainer(store, "b", 3.0, 30)}
    exp = make(tmp_path, behaviours, store, save_breakpoints=True, round_limit=4)
    exp.set_training_args({"epochs": 2, "optimizer_args": {"lr": 0.5}})
    assert exp.run(rounds=2) == 2
    folder = exp.experimentation_path()
    assert folder.name == "Experiment_0000"
    assert sorted(p.name for p in folder.iterdir()) == ["breakpoint_0001", "breakpoint_0002", "rounds"]
    assert sorted(p.name for p in (folder / "breakpoint_0002").iterdir()) == [
        "algorithm.safetensors",
        "breakpoint.json",
        "params.safetensors",
        "plan.py",
    ]

    resumed = Experiment.load_breakpoint(tmp_path, network=creds())
    assert resumed.round_current() == 2 and resumed.round_limit() == 4
    assert resumed.job_id() == exp.job_id()
    assert resumed.training_plan_hash() == exp.training_plan_hash()
    assert resumed.training_args().epochs == 2 and resumed.model_args() == {"n": 2}
    assert resumed.training_data() == exp.training_data()
    assert sorted(resumed.training_replies()) == [0, 1]
    for k, v in exp.training_plan().get_parameters().items():
        assert torch.equal(resumed.training_plan().get_parameters()[k], v)
        assert torch.equal(resumed.aggregated_params()[1]["params"][k], v)

    resumed._requests = FakeRequests(behaviours)  # type: ignore[assignment]
    resumed._filestore = store  # type: ignore[assignment]
    assert resumed.run() == 2
    assert resumed.round_current() == 4
    assert (folder / "breakpoint_0004").is_dir()
    assert {m.round for m in resumed._requests.sent} == {2, 3}
    # a second load of the same breakpoint works too (Fed-BioMed #1181)
    assert Experiment.load_breakpoint(folder / "breakpoint_0002", network=creds()).round_current() == 2


def test_round_limit_handling(tmp_path: Path) -> None:
    store = FakeStore()
    exp = make(tmp_path, {"a": trainer(store, "a", 1.0, 1)}, store, round_limit=1)
    assert exp.run(rounds=3) == 1
    assert exp.run_once() == 0
    assert exp.run(rounds=2, increase=True) == 2 and exp.round_limit() == 3
    info = exp.info()
    assert info["rounds done"] == 3 and info["missing"] == []
