"""Compressed updates end to end: the shared federation (three node daemons as processes, both brokers), the
same plan and seeds run uncompressed and with int8 + error feedback; the held-out accuracy of the compressed
run must be within one point of plain FedAvg's, and each node keeps its error-feedback residual in its state
folder as SCAFFOLD keeps c_i. (This model has 34 parameters: its codec blob's header outweighs what int8
saves, so bytes are compared in tests/unit/test_codecs.py and bench/compression.py, not here.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsilo.common.serialization import params_from_bytes
from fedsilo.node.compression import RESIDUAL_FILE
from tests.e2e.federation import HOSPITALS, Approved, Federation, accuracy

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
