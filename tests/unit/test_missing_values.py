"""Missing values: counted per column at registration (refused, or kept with a warning), and a round
that meets NaN stops at the step where it appears instead of sending a loss JSON cannot carry."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from fedsilo.common.dataformats import DatasetFormatError, missing_counts, read_csv
from fedsilo.common.datasets import CsvDataset
from fedsilo.common.errors import NonFiniteError
from fedsilo.common.training_plan import DataManager, TorchTrainingPlan
from fedsilo.network.messages import LogMessage, TrainReply, TrainRequest
from fedsilo.node.cli import node
from fedsilo.node.datasets import DatasetStore
from fedsilo.node.round import _finite_metrics
from tests.support.creds import offline_credentials
from tests.support.training import train_metrics

HOLES = "a,b,c,label\n1,2,3,0\n,2,3,1\nNA,2,n/a,0\n4,nan,3,1\n5,2,3,0\n6,2,3,1\n"
"""a: empty + NA (2 missing), b: nan (1), c: n/a (1)."""


class Plan(TorchTrainingPlan):
    def init_model(self, model_args):
        return nn.Linear(3, 2)

    def training_data(self, batch_size):
        return DataManager(CsvDataset(self.dataset_path), batch_size=batch_size)

    def training_step(self, data, target):
        return nn.functional.cross_entropy(self.model()(data), target)


def plan_on(csv: Path, **targs) -> Plan:
    plan = Plan()
    plan.dataset_path, plan.node_id = str(csv), "hospital-x"
    plan.post_init({}, {"batch_size": 2, **targs})
    return plan


@pytest.fixture
def node_env(tmp_path: Path):
    (tmp_path / "data").mkdir()
    holes = tmp_path / "data" / "holes.csv"
    holes.write_text(HOLES)
    creds = offline_credentials(tmp_path / "n.json", "n")
    nodedir = tmp_path / "node"
    runner = CliRunner()
    r = runner.invoke(node, ["init", "--dir", str(nodedir), "--name", "n", "--network", str(creds)])
    assert r.exit_code == 0, r.output
    return runner, nodedir, holes


def add(runner: CliRunner, nodedir: Path, csv: Path, *extra: str):
    return runner.invoke(node, ["dataset", "add", "--dir", str(nodedir), "--name", "h", "--tags", "t",
                                "--type", "csv", "--path", str(csv), "--target", "label", *extra])  # fmt: skip


def test_missing_markers_read_as_nan_and_counted(tmp_path: Path) -> None:
    (tmp_path / "h.csv").write_text(HOLES)
    columns, data = read_csv(tmp_path / "h.csv")
    assert data.shape == (6, 4)
    assert missing_counts(columns, data) == {"a": 2, "b": 1, "c": 1}
    (tmp_path / "bad.csv").write_text("a,label\nx,0\n")
    with pytest.raises(DatasetFormatError, match="numeric or missing"):
        read_csv(tmp_path / "bad.csv")


def test_registration_refuses_missing_values_by_default_naming_columns(node_env) -> None:
    runner, nodedir, holes = node_env
    r = add(runner, nodedir, holes)
    assert r.exit_code == 1
    assert "4 missing or non-finite values: a (2), b (1), c (1)" in r.output, r.output
    assert "--missing keep" in r.output
    assert DatasetStore(nodedir).list() == []
    holes.with_name("inf.csv").write_text("a,b,c,label\n1,inf,3,0\n1,2,3,1\n")  # parsed by the C path
    r = add(runner, nodedir, holes.with_name("inf.csv"))
    assert r.exit_code == 1 and "b (1)" in r.output, r.output


def test_keep_records_counts_and_a_warning_researchers_see(node_env) -> None:
    runner, nodedir, holes = node_env
    r = add(runner, nodedir, holes, "--missing", "keep")
    assert r.exit_code == 0, r.output
    assert "warning: kept 4 missing or non-finite values" in r.output
    record = DatasetStore(nodedir).get("h")
    assert record["summary"]["missing"] == {"a": 2, "b": 1, "c": 1}  # the node keeps exact counts
    columns = record["summary"]["columns"]
    assert columns["a"] == {"type": "numeric", "dtype": "int64", "min": 1.0, "max": 6.0, "mean": 4.0}  # values present
    assert all(v is None or math.isfinite(v) for c in columns.values() for v in (c["min"], c["max"], c["mean"]))
    info = DatasetStore.info(record, min_count=2)  # what a search reply carries: counts below min_count hidden
    assert info.summary["missing"] == {"a": 2, "b": "< 2", "c": "< 2"}
    assert "a (2)" in info.summary["warnings"][0] and "b (< 2)" in info.summary["warnings"][0]
    assert info.summary["columns"]["a"] == {"type": "numeric", "dtype": "int64", "count": 4}  # no min, max, mean
    info.model_dump_json()  # no NaN left to be refused on the wire


def test_nan_loss_stops_at_the_step_naming_node_and_step(tmp_path: Path) -> None:
    csv = tmp_path / "h.csv"
    csv.write_text(HOLES)
    plan = plan_on(csv, epochs=1)
    before = plan.get_parameters()
    scalars = []
    with pytest.raises(NonFiniteError, match=r"loss is nan at step 1 \(epoch 1, batch 1\) on node 'hospital-x'"):
        train_metrics(plan, plan.data_manager().loader(), on_scalar=lambda *a: scalars.append(a))
    assert scalars == []  # no NaN was streamed
    assert all(torch.equal(before[k], v) for k, v in plan.get_parameters().items())  # no step was taken


def test_diverging_parameters_are_refused_after_training(tmp_path: Path) -> None:
    csv = tmp_path / "ok.csv"
    csv.write_text("a,b,c,label\n" + "".join(f"{i * 1000},{i},{i},{i % 2}\n" for i in range(1, 9)))
    plan = plan_on(csv, num_updates=1, optimizer_args={"lr": 3e38})  # lr x gradient overflows float32
    with pytest.raises(NonFiniteError, match="hold NaN or infinity after step"):
        train_metrics(plan, plan.data_manager().loader())


def test_non_finite_metrics_are_left_out_and_reported() -> None:
    request = TrainRequest(sender="r", job_id="j", round=3, dataset_id="d", plan={"sha256": "a" * 64, "size": 1},
                           plan_name="P", blobs={"params": {"sha256": "b" * 64, "size": 1}})  # fmt: skip

    class Ctx:
        node_id = "hospital-x"

    sent = []
    metrics = {"loss": 0.5, "test_auc": float("nan"), "epsilon": np.float64("inf")}
    kept = _finite_metrics(metrics, request, Ctx(), sent.append)  # type: ignore[arg-type]
    assert kept == {"loss": 0.5}
    assert [m.text for m in sent if isinstance(m, LogMessage)] == [
        "round 3: metric 'test_auc' is nan; left out of the reply",
        "round 3: metric 'epsilon' is inf; left out of the reply",
    ]
    TrainReply(sender="n", node_id="n", in_reply_to="x", job_id="j", round=3, dataset_id="d",
               blobs={"params": {"sha256": "a" * 64, "size": 1}}, sample_size=1, metrics=kept).to_json()  # fmt: skip
