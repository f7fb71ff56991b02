"""The worker's half of evaluation (node/round.py), in-process with the bytes the daemon would hand over:
`test_on_global_updates` measures the received model before training, `test_on_local_updates` gates `test_*`,
and an EvaluateRequest trains nothing and returns no blob. Expected numbers are computed here in plain torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedsilo.common.datasets import CsvDataset
from fedsilo.common.serialization import params_to_bytes
from fedsilo.common.training_plan import DataManager
from fedsilo.network.messages import BlobRef, EvaluateRequest, TrainRequest
from fedsilo.node.config import NodeConfig
from fedsilo.node.round import RoundContext, WorkerTask, execute_round
from tests.support.plans import LOGREG_PLAN

ROWS = 50
REF = BlobRef(sha256="a" * 64, size=1)
# A model that is far from what 3 epochs at lr 1 make of it: its metrics and the update's differ.
RECEIVED = {"weight": torch.tensor([[2.0, 0.0, 0.0, 0.0], [-2.0, 0.0, 0.0, 0.0]]), "bias": torch.zeros(2)}


@pytest.fixture
def csv(tmp_path: Path) -> Path:
    x = np.random.default_rng(7).normal(size=(ROWS, 4))
    path = tmp_path / "d.csv"
    path.write_text("a,b,c,d,label\n" + "".join(",".join(f"{v:.4f}" for v in r) + f",{int(r[1] > 0)}\n" for r in x))
    return path


def _run(kind: type, csv: Path, tmp_path: Path, **args: object):
    fields = {"sender": "r", "job_id": "j", "round": 1, "dataset_id": "ds", "plan": REF, "plan_name": "HeartPlan",
              "blobs": {"params": REF}, "training_args": {"batch_size": 8, "random_seed": 5, **args}}  # fmt: skip
    request = kind(**fields)
    config = NodeConfig.model_validate({"node": {"name": "n", "node_id": "n"}})
    record = {"path": str(csv), "dataset_id": "ds", "shape": [ROWS, 5]}
    task = WorkerTask(request, LOGREG_PLAN, request.training_args, record, {"params": params_to_bytes(RECEIVED)},
                      tmp_path / "state")  # fmt: skip
    return execute_round(task, RoundContext(config), lambda message: None)


def _expected(csv: Path, test_ratio: float) -> tuple[dict[str, float], int]:
    """RECEIVED's loss and accuracy on the node's test split (the whole file when test_ratio is 0)."""
    dataset = CsvDataset(csv)
    _, test = DataManager(dataset, batch_size=8).split(test_ratio, seed=5)
    indices = list(test.dataset.indices) if test is not None else list(range(ROWS))
    x = torch.stack([dataset[i][0] for i in indices])
    y = torch.stack([torch.as_tensor(dataset[i][1]) for i in indices])
    out = nn.functional.linear(x, RECEIVED["weight"], RECEIVED["bias"])
    loss = float(nn.functional.cross_entropy(out, y))
    return {"loss": loss, "accuracy": float((out.argmax(1) == y).float().mean())}, len(indices)


def test_a_round_tests_the_received_model_before_training_and_the_update_after(csv: Path, tmp_path: Path) -> None:
    out = _run(TrainRequest, csv, tmp_path, test_ratio=0.2, test_on_global_updates=True, epochs=3,
               optimizer_args={"lr": 1.0})  # fmt: skip
    expected, n_test = _expected(csv, 0.2)
    assert out.test_samples == n_test == 10 and out.sample_size == ROWS - n_test
    assert out.metrics["global_loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert out.metrics["global_accuracy"] == pytest.approx(expected["accuracy"])
    assert out.metrics["test_loss"] != pytest.approx(out.metrics["global_loss"])  # the update was tested too
    assert "params" in out.blobs


def test_local_updates_are_tested_only_when_asked(csv: Path, tmp_path: Path) -> None:
    default = _run(TrainRequest, csv, tmp_path, test_ratio=0.2)
    assert "test_loss" in default.metrics and not any(k.startswith("global_") for k in default.metrics)
    off = _run(TrainRequest, csv, tmp_path, test_ratio=0.2, test_on_local_updates=False)
    assert not any(k.startswith(("test_", "global_")) for k in off.metrics) and off.test_samples == 0


@pytest.mark.parametrize("test_ratio", [0.2, 0.0], ids=["test-split", "whole-dataset"])
def test_an_evaluation_trains_nothing_and_returns_no_blob(csv: Path, tmp_path: Path, test_ratio: float) -> None:
    out = _run(EvaluateRequest, csv, tmp_path, test_ratio=test_ratio)
    expected, n = _expected(csv, test_ratio)
    assert out.blobs == {} and out.train_s == 0.0
    assert out.sample_size == out.test_samples == n == (10 if test_ratio else ROWS)
    assert out.metrics == pytest.approx(expected, rel=1e-5)
