"""Compressed updates end to end: the shared federation (three node daemons as processes, both brokers), the
same plan and seeds run uncompressed and with int8 + error feedback; the held-out accuracy of the compressed
run must be within one point of plain FedAvg's, and each node keeps its error-feedback residual in its state
folder as SCAFFOLD keeps c_i. (This model has 34 parameters: its codec blob's header outweighs what int8
saves, so bytes are compared in tests/unit/test_codecs.py and bench/compression.py, not here.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsilo.common.codecs import Compression
from fedsilo.common.codecs_update import encode_update
from fedsilo.common.serialization import params_from_bytes, params_to_bytes
from fedsilo.common.synthetic import FEATURES
from fedsilo.network.messages import DatasetInfo, TrainRequest
from fedsilo.node.compression import RESIDUAL_FILE
from tests.e2e.federation import HOSPITALS, TAG, Approved, Federation, accuracy
from tests.support.client import RawResearcher
from tests.support.fake_node import FakeNode

pytestmark = pytest.mark.broker("mosquitto")  # the node is the subject here; tests/conftest.py

ROUNDS = 3


def _run(fed: Federation, folder: Path, compression: str | None) -> tuple[float, dict, object]:
    x, y = fed.heldout
    with fed.experiment(folder, round_limit=ROUNDS, compression=compression) as exp:
        assert exp.run() == ROUNDS
        return accuracy(exp.training_plan().model(), x, y), exp.round_stats(), exp


@pytest.fixture(scope="module")
def plain(fed: Federation, approved: Approved, tmp_path_factory: pytest.TempPathFactory) -> tuple[float, dict]:
    acc, stats, _ = _run(fed, tmp_path_factory.mktemp("plain"), None)
    assert acc > 0.7, acc  # the plan learns: the comparison below means something
    return acc, stats


def test_int8_with_error_feedback_reaches_plain_fedavg_accuracy(fed: Federation, plain: tuple[float, dict],
                                                                 tmp_path: Path) -> None:  # fmt: skip
    plain_acc, plain_stats = plain
    acc, stats, exp = _run(fed, tmp_path, "int8")
    assert abs(acc - plain_acc) <= 0.01, (acc, plain_acc)
    for r in range(ROUNDS):
        replies = exp.training_replies()[r]
        assert len(replies) == len(HOSPITALS) and all(v["dropped"] is None for v in replies.values())
        caps = [v["applied_caps"]["compression"] for v in replies.values()]
        assert all(c["applied"] == "int8" and c["error_feedback"] for c in caps)
        assert stats[r]["bytes_up"] == sum(c["bytes"] for c in caps)  # the round table counts what was sent
        assert stats[r]["bytes_down"] == plain_stats[r]["bytes_down"]  # the global model travels as it did
    for name in HOSPITALS:  # the residual is the node's, per researcher and job
        state = fed.nodedir(name) / "state" / exp._credentials.party / exp._job_id / RESIDUAL_FILE
        residual = params_from_bytes(state.read_bytes())
        assert set(residual) == {"weight", "bias"}
    assert "bytes_up" in exp.metrics_table(per="round")


# ------------------------------------------------------------------ a hostile node with valid credentials
def _codec_blob(spec: str = "int8", change: dict | None = None) -> bytes:
    ref = {"weight": np.zeros((2, FEATURES), np.float32), "bias": np.zeros(2, np.float32)}  # as a node's daemon
    enc = encode_update({k: v + np.float32(0.1) for k, v in ref.items()}, ref, Compression.of(spec))
    enc.tensors.update(change or {})
    return enc.to_bytes()


CODEC_ATTACKS = {  # name -> (the params blob it sends, what the researcher's reason must say; None: accepted)
    "nan_scale": (_codec_blob(change={"s/weight": np.array(np.nan, np.float32)}), "the scale holds NaN"),
    "wrong_shape": (_codec_blob(change={"q/weight": np.zeros((FEATURES, 2), np.int8)}), "part 'q'"),
    "another_codec": (_codec_blob("float16"), "expected a int8 codec blob"),
    "plain_blob": (params_to_bytes({"weight": torch.full((2, FEATURES), 9.0), "bias": torch.zeros(2)}),
                   "expected a int8 codec blob"),
    "honest": (_codec_blob(), None),
}


class CodecRogue(FakeNode):
    attack = "honest"

    def __init__(self, fed: Federation) -> None:
        info = DatasetInfo(dataset_id="ds_codec_rogue", name="codec-rogue", tags=[TAG], data_type="csv",
                           shape=[50, FEATURES + 1])  # fmt: skip
        super().__init__(fed.network, f"codec-rogue-{fed.broker}", info, self._craft)

    def _craft(self, request: TrainRequest) -> tuple[bytes, int]:
        assert request.compression == Compression.of("int8")
        return CODEC_ATTACKS[self.attack][0], 50


def test_hostile_codec_blobs_are_dropped_with_a_reason_and_rounds_go_on(fed: Federation, approved: Approved,
                                                                        tmp_path: Path) -> None:  # fmt: skip
    rogue = CodecRogue(fed)
    try:
        with fed.experiment(tmp_path, nodes=["hospital-a", rogue.name], round_limit=len(CODEC_ATTACKS),
                            compression="int8") as exp:  # fmt: skip
            for r, (attack, (_, reason)) in enumerate(CODEC_ATTACKS.items()):
                rogue.attack = attack
                exp.run_once()
                replies = exp.training_replies()[r]
                assert replies["hospital-a"]["dropped"] is None, (attack, replies)
                dropped = replies[rogue.name]["dropped"]
                if reason is None:
                    assert dropped is None, (attack, dropped)
                else:
                    assert dropped["kind"] == "invalid" and reason in dropped["reason"], (attack, dropped)
                assert all(bool(torch.isfinite(v).all()) for v in exp.training_plan().get_parameters().values())
    finally:
        rogue.close()


@pytest.mark.parametrize("compression, secagg, why", [
    ({"codec": "topk", "fraction": 2}, False, "fraction"),
    ({"codec": "int4"}, False, "codec"),
    ({"codec": "int8"}, True, "secure aggregation"),
])  # fmt: skip
def test_a_node_refuses_a_bad_codec_request_on_receipt(fed: Federation, client: RawResearcher, compression: dict,
                                                       secagg: bool, why: str) -> None:  # fmt: skip
    request = client.train_request("class P: pass\n", "P", fed.datasets["hospital-a"], params={"w": torch.zeros(1)})
    payload = json.loads(request.to_json())
    payload.update({"compression": compression, **({"secagg": {"shares": {}}} if secagg else {})})
    client.send_raw("hospital-a", json.dumps(payload).encode())
    err = client.wait(request.request_id, ("error",))
    assert err.code == "FS502" and err.stage == "arguments" and why in err.message, err
