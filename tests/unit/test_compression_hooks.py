"""Compression on the round's path: the typed field of a TrainRequest (validated on receipt), the node's
`compress` stage with its residual kept like SCAFFOLD's c_i, and the researcher decoding (or dropping) each
node's codec blob before the algorithm's `add`."""

from __future__ import annotations

import json
import queue
from pathlib import Path

import numpy as np
import pytest
import torch
from test_experiment_offline import FakeStore, make  # the offline round's fakes of broker and file store

from fedsilo.common.arrays import arrays_from_bytes, arrays_to_bytes
from fedsilo.common.codecs import Compression
from fedsilo.common.codecs_update import decode_update, encode_update
from fedsilo.common.serialization import params_from_bytes, params_to_bytes, to_numpy
from fedsilo.network.messages import BlobRef, MessageError, SecaggTask, TaskAck, TrainReply, TrainRequest, parse_message
from fedsilo.node.algorithms import job_state_dir
from fedsilo.node.compression import RESIDUAL_FILE, compress
from fedsilo.node.config import NodeConfig, NodeSection
from fedsilo.node.daemon_round import DaemonRound, NodeResources, keep_state
from fedsilo.node.stages import RoundFailure, run_stages
from fedsilo.researcher import ExperimentError
from fedsilo.researcher.compression import compression_setting
from fedsilo.researcher.secagg import SecureAggregation

SHA = "a" * 64


def _request(**extra) -> TrainRequest:
    return TrainRequest(sender="researcher", job_id="job-1", round=0, dataset_id="ds", plan=BlobRef(sha256=SHA, size=1),
                        plan_name="P", blobs={"params": BlobRef(sha256=SHA, size=1)}, **extra)  # fmt: skip


# ------------------------------------------------------------------ the typed field, validated on receipt
def test_a_train_request_carries_its_compression_typed() -> None:
    msg = parse_message(_request(compression=Compression(codec="topk", fraction=0.1)).to_json())
    assert msg.compression == Compression(codec="topk", fraction=0.1) and msg.compression.error_feedback


@pytest.mark.parametrize("compression, why", [({"codec": "zip"}, "compression"),
                                              ({"codec": "topk", "fraction": 2}, "fraction"),
                                              ({"codec": "topk"}, "fraction"),
                                              ({"codec": "int8", "levels": 4}, "levels")])  # fmt: skip
def test_a_bad_compression_is_refused_on_receipt_naming_the_key(compression: dict, why: str) -> None:
    payload = json.loads(_request().to_json())
    payload["compression"] = compression
    with pytest.raises(MessageError, match=why):
        parse_message(json.dumps(payload).encode())


def test_compression_with_secure_aggregation_is_refused_on_receipt() -> None:
    payload = json.loads(_request(secagg=SecaggTask(shares={})).to_json())
    payload["compression"] = {"codec": "int8"}
    with pytest.raises(MessageError, match="secure aggregation"):
        parse_message(json.dumps(payload).encode())


def test_the_researcher_refuses_compression_with_secure_aggregation_or_a_bad_codec() -> None:
    with pytest.raises(ExperimentError, match="secure aggregation"):
        compression_setting("int8", SecureAggregation())
    with pytest.raises(ExperimentError, match="codec"):
        compression_setting("int4")
    assert compression_setting("float16") == Compression(codec="float16")


# ------------------------------------------------------------------ the node's stage
MODEL = {"w": torch.randn(30, 10, generator=torch.Generator().manual_seed(0)), "n": torch.tensor(2)}


def _np(params: dict) -> dict:
    """The daemon holds numpy arrays (it imports no torch)."""
    return {k: to_numpy(v) for k, v in params.items()}


def _node_round(tmp_path: Path, request: TrainRequest, update: dict) -> DaemonRound:
    cfg = NodeConfig(node=NodeSection(name="n1", node_id="n1"))
    cfg._dir = tmp_path / "node"
    node = NodeResources(config=cfg, datasets=None, plans=None, audit=None, files=None)  # type: ignore[arg-type]
    scratch = tmp_path / f"scratch-{len(list(tmp_path.glob('scratch-*')))}"
    r = DaemonRound(request=request, node=node, scratch=scratch)
    r.received = _np(MODEL)
    r.worker_blobs = {"params": params_to_bytes(update)}
    r.state_dir.mkdir(parents=True)
    return r


def _update(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": MODEL["w"] + 0.01 * torch.randn(30, 10, generator=g), "n": MODEL["n"] + 1}


def test_the_node_encodes_after_protection_and_keeps_the_residual_only_once_delivered(tmp_path: Path) -> None:
    spec = Compression(codec="topk", fraction=0.1)
    request = _request(compression=spec)
    job = job_state_dir(tmp_path / "node" / "state", "researcher", "job-1")
    r = _node_round(tmp_path, request, _update(1))
    (r.state_dir / RESIDUAL_FILE).write_bytes(b"the worker wrote this")  # plan code can write to its folder
    compress.fn(r)
    sent = decode_update(r.worker_blobs["params"], MODEL, spec)
    caps = r.applied["compression"]
    assert caps["applied"] == "topk" and caps["bytes"] < caps["plain_bytes"] / 2 and caps["error_feedback"]
    assert not (job / RESIDUAL_FILE).exists()  # not the job's until the upload succeeded
    keep_state.fn(r)
    residual = params_from_bytes((job / RESIDUAL_FILE).read_bytes())
    assert torch.allclose(sent["w"] - MODEL["w"] + residual["w"], _update(1)["w"] - MODEL["w"], atol=1e-6)
    # the next round starts from the job's residual, not from what its worker leaves in the scratch copy
    r2 = _node_round(tmp_path, request, _update(2))
    (r2.state_dir / RESIDUAL_FILE).write_bytes(params_to_bytes({"w": torch.full((30, 10), 1e6)}))
    compress.fn(r2)
    expected = encode_update(_np(_update(2)), _np(MODEL), spec, _np(residual)).to_bytes()
    assert r2.worker_blobs["params"] == expected


def test_without_compression_the_update_is_untouched_and_no_worker_residual_is_kept(tmp_path: Path) -> None:
    r = _node_round(tmp_path, _request(), _update(3))
    plain = r.worker_blobs["params"]
    (r.state_dir / RESIDUAL_FILE).write_bytes(b"junk")
    compress.fn(r)
    keep_state.fn(r)
    assert r.worker_blobs["params"] == plain and "compression" not in r.applied
    assert not (job_state_dir(tmp_path / "node" / "state", "researcher", "job-1") / RESIDUAL_FILE).exists()


def test_a_corrupt_residual_on_disk_restarts_from_zeros(tmp_path: Path) -> None:
    spec = Compression.of("int8")
    job = job_state_dir(tmp_path / "node" / "state", "researcher", "job-1")
    job.mkdir(parents=True)
    (job / RESIDUAL_FILE).write_bytes(b"\x80\x04not safetensors")
    r = _node_round(tmp_path, _request(compression=spec), _update(4))
    compress.fn(r)
    assert r.worker_blobs["params"] == encode_update(_np(_update(4)), _np(MODEL), spec).to_bytes()


def test_the_stage_refuses_a_masked_round_even_if_receipt_was_bypassed(tmp_path: Path) -> None:
    request = _request(secagg=SecaggTask(shares={}))
    object.__setattr__(request, "compression", Compression.of("int8"))  # built past validation
    r = _node_round(tmp_path, request, _update(5))
    with pytest.raises(RoundFailure, match="secure aggregation"):
        run_stages([compress], r)


# ------------------------------------------------------------------ the researcher decodes, or drops
def _codec_node(store: FakeStore, node: str, blob) -> object:
    """A node that answers with `blob(global params) -> bytes` as its params blob (numpy arrays, as a daemon)."""

    def behave(req: TrainRequest, q: queue.Queue) -> None:
        data = blob(arrays_from_bytes(store.download_bytes(req.params)), req)
        ref = store.upload_bytes(data)
        common = {"sender": node, "node_id": node, "in_reply_to": req.request_id}
        q.put(TaskAck(**common, job_id=req.job_id, round=req.round))
        q.put(TrainReply(**common, job_id=req.job_id, round=req.round, dataset_id=req.dataset_id,
                         blobs={"params": ref}, sample_size=10, metrics={"loss": 1.0}))  # fmt: skip

    return behave


def _honest(params: dict, req: TrainRequest) -> bytes:
    assert req.compression is not None
    return encode_update({k: v + 1.0 for k, v in params.items()}, params, req.compression).to_bytes()


def _nan_scale(params: dict, req: TrainRequest) -> bytes:
    enc = encode_update({k: v + 1.0 for k, v in params.items()}, params, req.compression)
    enc.tensors[next(k for k in enc.tensors if k.startswith("s/"))] = np.array(np.nan, np.float32)
    return enc.to_bytes()


def _wrong_shape(params: dict, req: TrainRequest) -> bytes:
    enc = encode_update(params, params, req.compression)
    name = next(k for k in enc.tensors if k.startswith("q/"))
    enc.tensors[name] = np.zeros(enc.tensors[name].size + 1, dtype=np.int8)
    return enc.to_bytes()


def _plain(params: dict, req: TrainRequest) -> bytes:
    return arrays_to_bytes({k: v + 100.0 for k, v in params.items()})  # ignores the codec it was asked for


def test_the_researcher_decodes_codec_blobs_and_drops_hostile_ones(tmp_path: Path) -> None:
    store = FakeStore()
    nodes = {"a": _codec_node(store, "a", _honest), "b": _codec_node(store, "b", _nan_scale),
             "c": _codec_node(store, "c", _wrong_shape), "d": _codec_node(store, "d", _plain)}  # fmt: skip
    exp = make(tmp_path, nodes, store, compression="int8")
    before = exp.training_plan().get_parameters()
    exp.run_once()
    assert all(m.compression == Compression.of("int8") for m in exp._requests.sent)
    replies = exp.training_replies()[0]
    assert replies["a"]["dropped"] is None
    assert "scale" in replies["b"]["dropped"]["reason"] and replies["b"]["dropped"]["kind"] == "invalid"
    assert "part 'q'" in replies["c"]["dropped"]["reason"]
    assert "codec blob" in replies["d"]["dropped"]["reason"]
    after = exp.aggregated_params()[0]["params"]
    for k in before:  # node a alone: +1 within int8's error (its delta is exactly representable)
        assert torch.allclose(after[k], before[k] + 1.0, atol=1e-5)
    stats = exp.round_stats()[0]
    assert 0 < stats["bytes_up"] < stats["bytes_down"]
    assert "bytes_up" in exp.metrics_table(per="round")


def test_the_node_compresses_after_protection_and_before_masking_and_upload() -> None:
    from fedsilo.node.daemon_round import AFTER_WORKER

    names = [s.name for s in AFTER_WORKER]
    assert names.index("protect") < names.index("compress") < names.index("mask_update") < names.index("upload")


def test_stochastic_rounding_on_the_node_is_not_reproducible(tmp_path: Path) -> None:
    """The same update under the same torch and numpy seeds draws different roundings: the generator is seeded
    by the OS."""
    spec = Compression(codec="int8", rounding="stochastic", error_feedback=False)
    blobs = []
    for i in range(2):
        r = _node_round(tmp_path / str(i), _request(compression=spec), _update(6))
        torch.manual_seed(0)  # whatever seeded torch's or numpy's global generator (in the daemon: nothing should)
        np.random.seed(0)
        compress.fn(r)
        blobs.append(r.worker_blobs["params"])
    assert blobs[0] != blobs[1]


def test_a_resumed_experiment_keeps_its_codec(tmp_path: Path) -> None:
    """The residual lives on the nodes under the job id, which a breakpoint keeps: so must the codec be kept."""
    from test_experiment_offline import creds

    from fedsilo.researcher import Experiment

    store = FakeStore()
    spec = Compression(codec="topk", fraction=0.5)
    exp = make(tmp_path, {"a": _codec_node(store, "a", _honest)}, store, compression=spec, save_breakpoints=True)
    exp.run_once()
    resumed = Experiment.load_breakpoint(exp.experimentation_path(), network=creds())
    assert resumed._compression == spec and resumed.job_id() == exp.job_id()
