"""Metrics a plan returns leave the node as finite numbers with a bounded count and short names (issue 10).

Hostile `testing_step`s run through the worker's half of a round (node/round.py, in-process with the bytes
the daemon would hand over): each time the update is still returned, the good metrics kept, what was left out
named in a WARNING for the researcher, and the reply fits the wire. The daemon's second check
(`bound_reply_metrics`) is fed a tampered worker's result directly."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsilo.common.serialization import params_to_bytes
from fedsilo.network.messages import MAX_MESSAGE_BYTES, BlobRef, LogMessage, TrainReply, TrainRequest
from fedsilo.node.config import Limits, NodeConfig
from fedsilo.node.metric_bounds import MetricsAccumulator, bound_reply_metrics
from fedsilo.node.round import RoundContext, WorkerTask, execute_round
from tests.support.plans import LOGREG_PLAN
from tests.support.tables import write_sign_csv

ROWS = 40
REF = BlobRef(sha256="a" * 64, size=1)
RECEIVED = {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}

HOSTILE = {
    "nan": 'return {"accuracy": 0.5, "nan_metric": float("nan")}',
    "million_keys": 'return {"accuracy": 0.5, **{f"k{i}": 1.0 for i in range(1_000_000)}}',
    "string_value": 'return {"accuracy": 0.5, "note": "all good"}',
    "string_output": 'return "all good"',
    "huge_tensor": 'return {"accuracy": 0.5, "big": torch.zeros(10_000_000)}',
    "long_name": 'return {"accuracy": 0.5, "x" * 100_000: 1.0}',
}
EXPECTED_WARNING = {
    "nan": "'nan_metric': not finite (nan)",
    "million_keys": "'k31', 'k32', 'k33' and 999966 more: testing_step returned 1000001 metrics, more than "
    "[limits] max_metrics = 32",
    "string_value": "'note': a str, not a number",
    "string_output": "testing_step returned a str, not a dict of metrics",
    "huge_tensor": "'big': a Tensor of 10000000 elements, not one number",
    "long_name": "a metric's name must be text of 1 to 64 printable characters",
}


def _plan(body: str) -> str:
    return LOGREG_PLAN + f"\n    def testing_step(self, data, target):\n        {body}\n"


@pytest.fixture(scope="module")
def csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sign_csv(tmp_path_factory.mktemp("bounds") / "d.csv", ROWS, seed=3)


def _round(source: str, csv: Path, tmp_path: Path):
    request = TrainRequest(sender="r", job_id="j", round=2, dataset_id="ds", plan=REF, plan_name="HeartPlan",
                           blobs={"params": REF}, training_args={"batch_size": 20, "test_ratio": 0.5})  # fmt: skip
    config = NodeConfig.model_validate({"node": {"name": "n", "node_id": "n"}})
    task = WorkerTask(request, source, request.training_args, {"path": str(csv), "dataset_id": "ds",
                      "shape": [ROWS, 5]}, {"params": params_to_bytes(RECEIVED)}, tmp_path / "state")  # fmt: skip
    sent: list = []
    return execute_round(task, RoundContext(config), sent.append), [m.text for m in sent if isinstance(m, LogMessage)]


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_testing_step_loses_its_bad_metrics_not_the_round(case: str, csv: Path, tmp_path: Path) -> None:
    out, warnings = _round(_plan(HOSTILE[case]), csv, tmp_path)
    assert "params" in out.blobs and out.sample_size == ROWS // 2  # the update still counts
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.metrics.values())
    assert len(out.metrics) <= 32 + 16 and all(len(k) <= 64 + len("global_") for k in out.metrics)
    if case != "string_output":
        assert out.metrics["test_accuracy"] == 0.5  # the good metric of the same batch is kept
    assert [w for w in warnings if EXPECTED_WARNING[case] in w], warnings
    assert len(warnings) == 1 and len(warnings[0]) < 400  # one short line, whatever the plan's size
    reply = TrainReply(sender="n", node_id="n", in_reply_to="x", job_id="j", round=2, dataset_id="ds",
                       blobs={"params": REF}, sample_size=out.sample_size, metrics=out.metrics)  # fmt: skip
    assert len(reply.to_json()) < MAX_MESSAGE_BYTES


def test_an_undefined_metric_and_a_mixed_one_are_left_out_with_their_reason() -> None:
    from fedsilo.common.metrics import Accuracy, RocAuc

    acc = MetricsAccumulator(max_metrics=4, max_name=10)
    one_class = torch.tensor([1, 1])
    acc.add({"auc": RocAuc.of(torch.tensor([0.3, 0.6]), one_class), "acc": Accuracy.of(torch.ones(2), one_class),
             "flip": 0.5, "np": np.float32(0.25)}, samples=2)  # fmt: skip
    acc.add({"auc": RocAuc.of(torch.tensor([0.7]), torch.tensor([1])), "flip": Accuracy(1, 1), "np": np.array([0.75]),
             "new": 1.0}, samples=1)  # fmt: skip
    assert acc.result() == {"acc": 1.0, "np": pytest.approx((0.25 * 2 + 0.75) / 3)}
    assert acc.warnings() == [
        "test metrics left out: 'flip': a number in one batch, a Metric in another",
        "test metrics left out: 'new': more than [limits] max_metrics = 4 distinct metrics",
        "test metrics left out: 'auc': not finite (nan)",
    ]


def test_the_daemon_bounds_a_tampered_workers_metrics_again() -> None:
    limits = Limits(max_metrics=2, max_metric_name=8)
    tampered = {"loss": 0.5, "test_auc": math.nan, "global_" + "y" * 9: 1.0, "bell\x07": 2.0,
                **{f"m{i}": float(i) for i in range(100)}}  # fmt: skip
    kept, reasons = bound_reply_metrics(tampered, limits)
    assert kept == {"loss": 0.5, **{f"m{i}": float(i) for i in range(16)}}  # cap 2 x 2 + 16 = 20 names read
    assert reasons == [
        "reply metrics left out: 'test_auc': not finite",
        "reply metrics left out: 'global_yyyyyyyyy', 'bell\\x07': a name must be text of 1 to 15 printable characters",
        "reply metrics left out: '(the rest)' and 83 more: 104 metrics, more than 20",
    ]
