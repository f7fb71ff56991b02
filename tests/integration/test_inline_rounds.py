"""Small blobs inline in the messages, with real parts (issue 11): a network (each broker, the file store under
uvicorn over TLS), one node daemon with its sandboxed worker, an `Experiment` and a raw researcher.

A small model's round makes no file-store request for the model or the update (neither is ever stored, and a
download of either would fail the round); a model over `INLINE_BLOB_BYTES` still goes through the store. A
request at the message limit crosses both brokers. Inline data that disagrees with its ref is refused at parse
and nothing is queued; a replayed inline request is refused by the replay guard; the node's audit log and log
never hold the inline bytes.
"""

from __future__ import annotations

import base64
import gc
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from fedsilo.common.datasets import CsvDataset
from fedsilo.common.errors import ErrorCode
from fedsilo.common.hashing import BLOB_DIGEST, digest_bytes
from fedsilo.common.serialization import params_to_buffers, params_to_bytes
from fedsilo.common.training_plan import DataManager, TorchTrainingPlan
from fedsilo.network.message_base import INLINE_BLOB_BYTES, BlobRef
from fedsilo.network.messages import MAX_MESSAGE_BYTES, PingRequest, TrainRequest
from fedsilo.node.config import node_paths
from fedsilo.researcher import Experiment
from tests.support.brokers import BOTH
from tests.support.one_node import OneNode
from tests.support.plans import LOGREG_PLAN


class WidePlan(TorchTrainingPlan):
    """4 -> hidden -> 2: `hidden` = 8 is a few hundred bytes, 20,000 is 560 KB (over INLINE_BLOB_BYTES)."""

    def init_model(self, model_args):
        return nn.Sequential(nn.Linear(4, model_args["hidden"]), nn.Linear(model_args["hidden"], 2))

    def training_data(self, batch_size):
        return DataManager(CsvDataset(self.dataset_path), batch_size=batch_size, shuffle=False)

    def training_step(self, data, target):
        return nn.functional.cross_entropy(self.model()(data), target)


@pytest.fixture(scope="module", params=BOTH)
def one(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OneNode]:
    node = OneNode.start(tmp_path_factory.mktemp(f"inline-{request.param}"), request.param, plans=[LOGREG_PLAN],
                         node={"require_approval": False})  # fmt: skip
    yield node
    node.stop()


def _stored(one: OneNode) -> dict[str, str]:
    """The file store's own index: blob key -> the party that uploaded it."""
    db = sqlite3.connect(one.net.netdir / "filestore" / "db.sqlite3")
    try:
        return dict(db.execute("SELECT key, uploaded_by FROM filestore_blob").fetchall())
    finally:
        db.close()


def _round(one: OneNode, folder: Path, hidden: int) -> tuple[Experiment, str, int]:
    """One round of WidePlan: the experiment, the store key and size of the global model it started from."""
    exp = Experiment(tags=["demo"], training_plan_class=WidePlan, model_args={"hidden": hidden},
                     training_args={"epochs": 1, "batch_size": 16, "optimizer_args": {"lr": 0.1}}, round_limit=1,
                     network=str(one.net.netdir), experimentation_folder=str(folder))  # fmt: skip
    blob = params_to_bytes(exp.training_plan().get_parameters())
    assert exp.run() == 1
    replies = exp.training_replies()[0]
    assert [r["dropped"] for r in replies.values()] == [None], replies
    return exp, BlobRef.named(BLOB_DIGEST, digest_bytes(blob, BLOB_DIGEST), len(blob)).key, len(blob)


def test_a_small_model_round_stores_nothing_and_the_researcher_keeps_no_inline_bytes(one: OneNode, tmp_path: Path
                                                                                     ) -> None:  # fmt: skip
    before = _stored(one)
    exp, model_sha, size = _round(one, tmp_path, hidden=8)
    try:
        new = {sha: by for sha, by in _stored(one).items() if sha not in before}
        assert model_sha not in new and list(new.values()) == ["researcher"]  # the plan, and nothing else
        assert exp.round_stats()[0]["bytes_up"] == size  # the update came (inline), its size as a stored one
        gc.collect()
        kept = [o for o in gc.get_objects() if type(o) is BlobRef and o.data is not None and o.size == size]
        assert kept == []  # neither the requests nor the replies outlive the round with their data
    finally:
        exp.close()


def test_a_model_over_the_inline_limit_goes_through_the_store_and_leaves_it_with_the_round(
        one: OneNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The model and the update are stored (the researcher releases both: it uploaded one, downloaded the other),
    and once the node has released its holds too (after its reply) the store keeps neither."""
    from fedsilo.network.filestore_client import FileStoreClient

    released: list[BlobRef] = []
    real = FileStoreClient.release_all

    def spy(self: FileStoreClient, refs) -> None:
        refs = list(refs)
        released.extend(r for r in refs if r.data is None)
        real(self, refs)

    monkeypatch.setattr(FileStoreClient, "release_all", spy)
    before = _stored(one)
    exp, model_sha, size = _round(one, tmp_path, hidden=20_000)
    exp.close()
    assert size > INLINE_BLOB_BYTES
    shas = {r.key for r in released}
    assert model_sha in shas and len(shas) == 2  # the global model and the node's update went through the store
    deadline = time.monotonic() + 30  # the node releases its holds just after its reply: wait for that
    while shas & set(_stored(one)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not shas & set(_stored(one))
    new = {sha: by for sha, by in _stored(one).items() if sha not in before}
    assert len(new) <= 1 and set(new.values()) <= {"researcher"}  # at most the plan, kept for the next rounds


# ------------------------------------------------------------------ a raw researcher's requests
def _request(one: OneNode, params_blob: bytes) -> TrainRequest:
    r = one.researcher
    plan = r.files.upload_bytes(LOGREG_PLAN.encode(), digest="sha256")
    return TrainRequest(sender=r.party, job_id="inline", round=0, dataset_id=one.datasets["d1"], plan=plan,
                        plan_name="HeartPlan", blobs={"params": BlobRef.inline(params_blob)},
                        training_args={"epochs": 1, "batch_size": 16})  # fmt: skip


ZEROS = {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}


def test_a_request_at_the_message_limit_crosses_the_broker_and_trains(one: OneNode) -> None:
    pad = INLINE_BLOB_BYTES - len(params_to_bytes(ZEROS)) - 200  # safetensors metadata fills the inline room
    blob = params_to_buffers(ZEROS, metadata={"pad": "x" * pad}).tobytes()
    assert INLINE_BLOB_BYTES - 400 < len(blob) <= INLINE_BLOB_BYTES
    request = _request(one, blob)
    assert len(request.to_json()) > MAX_MESSAGE_BYTES - 256 * 1024  # the base64 of a full inline blob
    reply = one.researcher.ask("n1", request, ("train_reply", "error"))
    assert reply.kind == "train_reply", reply
    assert reply.params.data is not None and reply.timings["download_s"] < 1.0  # the update came back inline


def _audit(one: OneNode) -> str:
    return (node_paths(one.nodedir).audit.parent / "audit.jsonl").read_text()


def _entries(one: OneNode) -> list[dict]:
    return [json.loads(line) for line in _audit(one).splitlines()[1:]]


def _seen_state(one: OneNode, request_id: str) -> str | None:
    db = sqlite3.connect(node_paths(one.nodedir).queue / "seen.db")
    try:
        row = db.execute("SELECT state FROM seen WHERE request_id = ?", (request_id,)).fetchone()
    finally:
        db.close()
    return row[0] if row else None


@pytest.mark.parametrize("tamper", ["hash", "size", "base64"])
def test_inline_data_that_disagrees_with_its_ref_is_refused_and_nothing_is_queued(one: OneNode, tamper: str) -> None:
    blob = params_to_bytes(ZEROS)
    request = _request(one, blob)
    wire, b64 = request.to_json().decode(), base64.b64encode(blob).decode()
    other = {"hash": base64.b64encode(blob[:-1] + b"!").decode(), "size": base64.b64encode(blob + b"!!!").decode(),
             "base64": b64[:40] + "\\n" + b64[40:]}[tamper]  # fmt: skip
    audit_before = len(_audit(one))
    one.researcher.send_raw("n1", wire.replace(b64, other).encode())
    reply = one.researcher.wait(request.request_id, ("error", "task_ack", "train_reply"))
    assert reply.kind == "error" and reply.code == ErrorCode.MALFORMED_MESSAGE, reply
    assert "blobs.params.data" in reply.message, reply.message
    assert _seen_state(one, request.request_id) is None  # never queued, never run
    assert len(_audit(one)) - audit_before < 2000  # no round recorded, no data


def test_a_message_over_the_limit_is_refused_before_parsing(one: OneNode) -> None:
    request = PingRequest(sender=one.researcher.party)
    wire = request.to_json()
    over = wire[:-1] + b" " * (MAX_MESSAGE_BYTES - len(wire) + 1) + b"}"
    one.researcher.send_raw("n1", over)
    reply = one.researcher.wait(request.request_id, ("error", "ping_reply"))
    assert reply.kind == "error" and reply.code == ErrorCode.MALFORMED_MESSAGE and "refused" in reply.message


def test_a_replayed_inline_request_is_refused_and_no_inline_bytes_are_recorded(one: OneNode) -> None:
    blob = params_to_bytes({"weight": torch.full((2, 4), 0.25), "bias": torch.full((2,), -0.5)})
    request = _request(one, blob)
    wire = request.to_json()  # the same bytes twice: a copy, not the researcher's re-send (a fresh timestamp)
    one.researcher.send_raw("n1", wire)
    assert one.researcher.wait(request.request_id, ("train_reply", "error")).kind == "train_reply"
    one.researcher.send_raw("n1", wire)
    deadline = time.monotonic() + 60
    while not (refused := [e for e in _entries(one) if e["event"] == "request_refused"
                           and e["details"].get("request_id") == request.request_id]):  # fmt: skip
        assert time.monotonic() < deadline, "the replay was not audited"
        time.sleep(0.1)
    assert "replay" in refused[0]["details"]["reason"]
    assert one.researcher.ping("n1").kind == "ping_reply"  # handled in order: an answer to the copy came before
    assert [m.kind for m in one.researcher.received(request.request_id)] == ["task_ack"]  # the first copy's only
    b64 = base64.b64encode(blob).decode()
    for text in (_audit(one), one.log()):
        assert b64[:64] not in text and b64[-64:] not in text


# ------------------------------------------------------------------ the message's inline room
def test_a_node_inlines_its_blobs_while_the_reply_has_room_and_uploads_the_rest(one: OneNode) -> None:
    from fedsilo.node.transfer import upload_blobs

    blobs = {"params": b"p" * 300_000, "control": b"c" * 300_000, "tiny": memoryview(b"t" * 10)}
    refs = upload_blobs(one.researcher.files, blobs, reader=one.researcher.party)
    assert refs["params"].data == blobs["params"] and refs["tiny"].data == b"t" * 10  # inline: 300,010 bytes
    assert refs["control"].data is None and _stored(one).get(refs["control"].key) == one.researcher.party
    assert one.researcher.files.download_bytes(refs["control"]) == blobs["control"]


def test_the_researcher_inlines_a_request_s_blobs_within_its_room_and_uploads_the_rest(one: OneNode) -> None:
    from types import SimpleNamespace

    from fedsilo.common.training_args import TrainingArgs
    from fedsilo.network.messages import DatasetInfo
    from fedsilo.researcher.algorithms.base import NodeTask
    from fedsilo.researcher.round import task_requests

    model = {"w": torch.ones(75_000)}  # 300 KB: the model and SCAFFOLD's control do not both fit in 512 KiB
    control = {"w": torch.zeros(75_000)}
    info = DatasetInfo(dataset_id=one.datasets["d1"], name="d1", tags=["demo"], data_type="csv")
    ctx = SimpleNamespace(files=one.researcher.files, readers=["n1"], requests=SimpleNamespace(party="researcher"),
                          job_id="j", training_data={"n1": info, "n2": info}, plan=BlobRef(sha256="a" * 64, size=1),
                          plan_name="P", training_args=TrainingArgs(), model_args={}, compression=None)  # fmt: skip
    tasks = {n: NodeTask({"params": model, "control": control}) for n in ("n1", "n2")}
    outgoing, sent = task_requests(ctx, tasks, 0, TrainRequest)  # type: ignore[arg-type]
    for msg in outgoing.values():
        assert msg.blobs["params"].data == params_to_bytes(model) and msg.blobs["control"].data is None
        assert len(msg.to_json()) < MAX_MESSAGE_BYTES
    stored = _stored(one)
    assert outgoing["n1"].blobs["control"].key in stored and outgoing["n1"].blobs["params"].key not in stored
    assert len(sent) == 2  # each distinct blob serialised once for both nodes
