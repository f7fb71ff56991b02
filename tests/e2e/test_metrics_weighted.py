"""Validation metrics end to end on the shared federation (node daemons as processes, both brokers).

Two of its nodes get a second dataset of different sizes (60 and 180 rows: test splits of 15 and 45), and a
plan whose `testing_step` returns `classification_metrics` (accuracy, F1, AUC as sufficient statistics). Each
node's AUC must be the AUC of the received model over its whole test split (computed here by counting pairs,
without MONAI), the federation's the mean weighted by the test splits (not the plain mean: the two differ
here), and both must reach the researcher's table and TensorBoard. A hostile `testing_step` (NaN, a
million keys, a string, a tensor of 10^7 entries) costs the round nothing but its bad metrics, and the
researcher is told why. 90 s per broker on the 2-core dev machine at load 10-13 (other suites ran), besides
the shared federation's start-up."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from fedsilo.common.datasets import CsvDataset
from fedsilo.common.metrics import classification_metrics
from fedsilo.common.plan_source import plan_source
from fedsilo.common.synthetic import synthetic_cohort, write_cohort_csv
from fedsilo.common.training_args import TrainingArgs
from fedsilo.common.training_plan import DataManager, TorchTrainingPlan
from fedsilo.node.datasets import DatasetStore
from fedsilo.node.plans import PlanStore
from fedsilo.researcher.history import FEDERATION
from fedsilo.researcher.monitor import Monitor
from tests.e2e.federation import Federation

pytestmark = pytest.mark.broker("mosquitto")  # the node is the subject here; tests/conftest.py

TAG = "metrics-weighted"
ROWS = {"hospital-a": 60, "hospital-b": 180}
ARGS = {"epochs": 1, "batch_size": 8, "optimizer_args": {"lr": 0.2}, "test_ratio": 0.25, "random_seed": 4,
        "test_on_global_updates": True}  # fmt: skip


class Scored(TorchTrainingPlan):
    """Logistic regression; accuracy, F1 and AUC over the node's whole test split. With model_args `hostile`,
    every kind of metric a node must not pass on, beside one good one."""

    def init_model(self, model_args):
        return nn.Linear(model_args["n_features"], 2)

    def training_data(self, batch_size):
        return DataManager(CsvDataset(self.dataset_path), batch_size=batch_size, shuffle=True)

    def training_step(self, data, target):
        return nn.functional.cross_entropy(self.model()(data), target)

    def testing_step(self, data, target):
        if not self.model_args.get("hostile"):
            return classification_metrics(self.model()(data), target)
        bad = {f"k{i}": 1.0 for i in range(1_000_000)}
        return {"accuracy": 0.5, "nan": float("nan"), "note": "fine", "huge": torch.zeros(10_000_000), **bad}


@dataclass
class Sized:
    fed: Federation
    csv: dict[str, Path]


@pytest.fixture(scope="module")
def sized(fed: Federation) -> Sized:
    """The two datasets registered and the plan approved on the running daemons (they read their stores at
    each request)."""
    rng = np.random.default_rng(11)
    csv = {}
    for name, rows in ROWS.items():
        csv[name] = write_cohort_csv(fed.root / f"data-{name}" / f"{TAG}.csv", synthetic_cohort(rng, rows, 0.4))
        DatasetStore(fed.nodedir(name)).add(f"{name}-{TAG}", [TAG], "csv", csv[name], added_by="test", target="label")
        plans = PlanStore(fed.nodedir(name))
        plans.approve(plans.submit(plan_source(Scored), "Scored", "researcher")["sha256"], by="dm", note="e2e")
    return Sized(fed, csv)


def _auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """The probability that a positive outranks a negative (ties count half): the AUC, by counting pairs."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).float() + 0.5 * (pos[:, None] == neg[None, :]).float()
    return float(wins.mean())


def _test_split_auc(params: dict[str, torch.Tensor], csv: Path) -> tuple[float, int]:
    dataset = CsvDataset(csv)
    ta = TrainingArgs.parse(ARGS)
    _, test = DataManager(dataset, batch_size=8).split(ta.test_ratio, seed=ta.random_seed or 0)
    indices = list(test.dataset.indices)
    x = torch.stack([dataset[i][0] for i in indices])
    y = torch.stack([torch.as_tensor(dataset[i][1]) for i in indices])
    with torch.no_grad():
        probs = nn.functional.linear(x, params["weight"], params["bias"]).softmax(1)[:, 1]
    return _auc(probs, y), len(indices)


def test_each_nodes_auc_is_over_its_split_and_the_global_one_is_weighted_by_test_samples(
    sized: Sized, tmp_path: Path
) -> None:
    fed = sized.fed
    with fed.experiment(tmp_path, plan=Scored, tags=[TAG], training_args=ARGS, round_limit=2,
                        tensorboard=True) as exp:  # fmt: skip
        received = {k: v.clone() for k, v in exp.training_plan().get_parameters().items()}
        assert exp.run() == 2
        replies = {v["node_name"]: v for v in exp.training_replies()[0].values()}
        expected = {name: _test_split_auc(received, sized.csv[name]) for name in ROWS}
        for name, (auc, n_test) in expected.items():
            assert replies[name]["test_samples"] == n_test == ROWS[name] // 4
            assert replies[name]["metrics"]["global_auc"] == pytest.approx(auc, abs=1e-6)
        weighted = sum(a * n for a, n in expected.values()) / sum(n for _, n in expected.values())
        plain = sum(a for a, _ in expected.values()) / len(expected)
        assert abs(weighted - plain) > 1e-3  # the check below tells the two apart
        assert exp.validation_metrics("global_auc")[0] == pytest.approx(
            {"hospital-a": expected["hospital-a"][0], "hospital-b": expected["hospital-b"][0], FEDERATION: weighted})
        for key in ("test_auc", "test_f1", "global_accuracy"):  # every metric, both sides, each round
            for r in (0, 1):
                per = exp.validation_metrics(key)[r]
                total = sum(ROWS[n] // 4 * per[n] for n in ROWS) / sum(ROWS[n] // 4 for n in ROWS)
                assert per[FEDERATION] == pytest.approx(total)
        table = exp.metrics_table(["global_auc", "test_auc"], per="validation").splitlines()
        assert [line.split()[:3] for line in table[2:5]] == [["0", "hospital-a", "15"], ["0", "hospital-b", "45"],
                                                              ["0", "all", "nodes"]]  # fmt: skip
        assert f"{weighted:.4g}"[:5] in table[4]
        node_ids = {v["node_name"]: n for n, v in exp.training_replies()[0].items()}
        runs = {**{name: node_ids[name] for name in ROWS}, FEDERATION: Monitor.FEDERATION_RUN}
        for who, run in runs.items():
            board = EventAccumulator(str(exp.tensorboard_dir() / run)).Reload()
            curve = {e.step: e.value for e in board.Scalars("ROUND/global_auc")}
            assert curve == {r: pytest.approx(exp.validation_metrics("global_auc")[r][who], abs=1e-6) for r in (0, 1)}


def test_a_hostile_testing_step_loses_only_its_bad_metrics_and_the_researcher_is_told(
    sized: Sized, tmp_path: Path
) -> None:
    args = {**ARGS, "test_on_global_updates": False}
    with sized.fed.experiment(tmp_path, plan=Scored, tags=[TAG], training_args=args, round_limit=1) as exp:
        exp.set_model_args({**exp.model_args(), "hostile": True})
        assert exp.run() == 1
        replies = list(exp.training_replies()[0].values())
        warnings = [m.text for m in exp.monitor().logs if m.level == "WARNING"]
    for reply in replies:
        assert reply["dropped"] is None and reply["metrics"]["test_accuracy"] == 0.5
        assert not {"test_nan", "test_note", "test_huge", "test_k40"} & set(reply["metrics"])
    for reason in ("'note': a str, not a number", "'huge': a Tensor of 10000000 elements, not one number",
                   "testing_step returned 1000004 metrics, more than [limits] max_metrics = 32"):  # fmt: skip
        assert sum(reason in w for w in warnings) == len(ROWS), (reason, warnings)
    assert sum("'nan': not finite (nan)" in w for w in warnings) == len(ROWS)
