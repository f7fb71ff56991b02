"""Evaluation, researcher side and wire: the training arguments, the sample weighting, the algorithm's hooks,
the history's per-round means, TensorBoard, and what an evaluation request and reply may carry."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedsilo.common.training_args import TrainingArgs, TrainingArgsError
from fedsilo.network.messages import (
    BlobRef,
    DatasetInfo,
    EvaluateReply,
    EvaluateRequest,
    MessageError,
    TrainReply,
    TrainRequest,
    parse_message,
    parse_task,
)
from fedsilo.researcher import FedAverage, FedMedian, NodeEvaluation
from fedsilo.researcher.algorithms.base import weighted_means
from fedsilo.researcher.evaluation import EvaluationReport, round_evaluation
from fedsilo.researcher.history import History, NodeResult, RoundRecord
from fedsilo.researcher.monitor import Monitor
from fedsilo.researcher.strategies import Drop
from fedsilo.researcher.update_checks import InvalidUpdate, check_reply

REF = BlobRef(sha256="a" * 64, size=1)


# ------------------------------------------------------------------------------------ training arguments
def test_fedbiomed_test_keys_are_training_arguments_with_todays_defaults() -> None:
    ta = TrainingArgs.parse({"test_ratio": 0.25, "test_on_global_updates": True, "test_on_local_updates": False})
    assert (ta.tests_global, ta.tests_local) == (True, False)
    default = TrainingArgs.parse({"test_ratio": 0.25})
    assert (default.test_on_local_updates, default.test_on_global_updates) == (True, False)
    assert (default.tests_local, default.tests_global) == (True, False)  # today's behaviour: test_* when split
    assert not TrainingArgs.parse({}).tests_local  # no split, nothing to test on
    assert TrainingArgs.parse(ta.model_dump()) == ta  # the node re-parses a full dump when it caps arguments


def test_testing_the_global_model_without_a_test_split_is_refused_naming_the_keys() -> None:
    with pytest.raises(TrainingArgsError, match="'test_on_global_updates' needs a test split: set 'test_ratio'"):
        TrainingArgs.parse({"test_on_global_updates": True})
    with pytest.raises(TrainingArgsError, match="test_on_global_updates"):
        TrainingArgs.parse({"test_on_global_updates": "sometimes"})


# ------------------------------------------------------------------------------------ weighting
def test_weighted_means_weigh_each_node_by_its_test_split() -> None:
    results = [
        NodeEvaluation("a", 30, {"accuracy": 0.9, "loss": 0.2}),
        NodeEvaluation("b", 10, {"accuracy": 0.5}),  # no loss: the loss mean is a's alone
        NodeEvaluation("c", 0, {"accuracy": 0.0, "auc": 0.7}),  # no sample: no weight, and auc has none
    ]
    means = weighted_means(results)
    assert means == pytest.approx({"accuracy": (30 * 0.9 + 10 * 0.5) / 40, "loss": 0.2})  # 0.8, not 0.7
    assert "auc" not in means
    assert weighted_means([]) == {}


def test_the_algorithm_evaluates_the_global_model_everywhere_and_averages_by_default() -> None:
    glob = {"w": torch.ones(2)}
    tasks = FedMedian().configure_evaluate(3, ["a", "b"], glob)
    assert sorted(tasks) == ["a", "b"] and all(t.blobs == {"params": glob} for t in tasks.values())
    results = [NodeEvaluation("a", 3, {"accuracy": 1.0}), NodeEvaluation("b", 1, {"accuracy": 0.0})]
    assert FedAverage().aggregate_evaluate(results) == {"accuracy": 0.75}


def _node(node: str, samples: int, test_samples: int, dropped: bool = False, **metrics: float) -> NodeResult:
    drop = Drop(node, "error", "failed") if dropped else None
    return NodeResult(node, node, "ds", samples, metrics=metrics, test_samples=test_samples, dropped=drop)


def _record() -> RoundRecord:
    # Training samples and test splits differ on purpose: test metrics are weighted by the latter.
    nodes = {
        "a": _node("a", 90, 10, loss=1.0, global_accuracy=0.5, test_accuracy=0.9),
        "b": _node("b", 10, 30, loss=3.0, global_accuracy=0.7, test_accuracy=0.5),
        "c": _node("c", 50, 50, dropped=True),
    }
    return RoundRecord(0, nodes, {"wall_s": 1.0})


def test_a_rounds_global_and_local_metrics_are_weighted_by_test_samples_on_each_side() -> None:
    means = round_evaluation(_record(), FedAverage())
    assert means == pytest.approx({"global_accuracy": (10 * 0.5 + 30 * 0.7) / 40,
                                   "test_accuracy": (10 * 0.9 + 30 * 0.5) / 40})  # fmt: skip


def test_a_custom_aggregate_evaluate_is_what_the_round_records() -> None:
    class Worst(FedAverage):
        def aggregate_evaluate(self, results):
            keys = {k for r in results for k in r.metrics}
            return {k: min(r.metrics[k] for r in results if k in r.metrics) for k in keys}

    assert round_evaluation(_record(), Worst()) == {"global_accuracy": 0.5, "test_accuracy": 0.5}


# ------------------------------------------------------------------------------------ history
def test_the_round_table_shows_the_recorded_evaluation_means_and_they_survive_a_breakpoint() -> None:
    history = History()
    record = _record()
    history.add(record, round_evaluation(record, FedAverage()))
    history.evaluations[1] = EvaluationReport(1, {"accuracy": 0.8}, {"a": NodeEvaluation("a", 10, {})}).as_dict()
    header, _, row = history.metrics_table(["loss", "global_accuracy", "test_accuracy"], per="round").splitlines()
    # loss by training samples (90, 10): 1.2; accuracies by test samples (10, 30): 0.65 and 0.6
    cell = {k: row[header.index(k):].split()[0] for k in ("loss", "global_accuracy", "test_accuracy")}  # aligned
    assert list(cell.values()) == ["1.2", "0.65", "0.6"], row
    restored = History()
    restored.load_state(history.state())
    assert restored.round_metrics == history.round_metrics and restored.evaluations[1]["metrics"] == {"accuracy": 0.8}
    assert restored.replies[0]["a"]["test_samples"] == 10
    old = History()
    old.load_state({"training_replies": {}, "round_stats": {}})  # a breakpoint from before evaluation
    assert old.round_metrics == {} and old.evaluations == {}


def test_federation_metrics_reach_tensorboard_per_round(tmp_path: Path) -> None:
    monitor = Monitor(tmp_path)
    monitor.federation_scalars("ROUND", {"global_accuracy": 0.5}, 0)
    monitor.federation_scalars("ROUND", {"global_accuracy": 0.75}, 1)
    monitor.federation_scalars("EVALUATION", {"accuracy": 0.9}, 2)
    monitor.close()
    events = EventAccumulator(str(tmp_path / Monitor.FEDERATION_RUN)).Reload()
    assert [(e.step, e.value) for e in events.Scalars("ROUND/global_accuracy")] == [(0, 0.5), (1, 0.75)]
    assert [(e.step, e.value) for e in events.Scalars("EVALUATION/accuracy")] == [(2, pytest.approx(0.9))]


# ------------------------------------------------------------------------------------ wire
def _evaluate_request(**blobs: BlobRef) -> EvaluateRequest:
    return EvaluateRequest(sender="r", job_id="j", round=2, dataset_id="ds", plan=REF, plan_name="P",
                           blobs=blobs or {"params": REF}, training_args={"test_ratio": 0.2})  # fmt: skip


def test_an_evaluation_request_carries_the_global_model_only_and_is_a_task() -> None:
    req = _evaluate_request()
    assert isinstance(parse_message(req.to_json()), EvaluateRequest)
    assert isinstance(parse_task(req.to_json()), EvaluateRequest)
    train = TrainRequest(sender="r", job_id="j", round=0, dataset_id="ds", plan=REF, plan_name="P",
                         blobs={"params": REF})  # fmt: skip
    assert isinstance(parse_task(train.to_json()), TrainRequest)
    with pytest.raises(ValueError, match="exactly one blob, 'params'"):
        _evaluate_request(params=REF, control=REF)
    payload = req.to_json().replace(b'"evaluate_request"', b'"evaluate_request", "algorithm": {"name": "fedavg"}')
    with pytest.raises(MessageError, match="algorithm"):
        parse_message(payload)


def test_an_evaluation_reply_cannot_carry_an_update() -> None:
    reply = EvaluateReply(sender="n", node_id="n", in_reply_to="x", job_id="j", round=2, dataset_id="ds",
                          sample_size=12, metrics={"accuracy": 0.5})  # fmt: skip
    assert parse_message(reply.to_json()) == reply
    smuggled = reply.to_json().replace(b'"metrics"', b'"blobs": {"params": ' + REF.model_dump_json().encode()
                                       + b'}, "metrics"')  # fmt: skip
    with pytest.raises(MessageError, match="blobs"):
        parse_message(smuggled)


INFO = DatasetInfo(dataset_id="ds", name="cohort", tags=["t"], data_type="csv", shape=[100, 5])


def test_test_samples_are_checked_against_what_the_node_reported() -> None:
    def train(samples: int, test: int) -> TrainReply:
        return TrainReply(sender="n", node_id="n", in_reply_to="x", job_id="j", round=0, dataset_id="ds",
                          blobs={"params": REF}, sample_size=samples, test_samples=test)  # fmt: skip

    check_reply(train(80, 20), INFO)
    with pytest.raises(InvalidUpdate, match="claims 80 training samples and 21 test samples but reported 100"):
        check_reply(train(80, 21), INFO)
    evaluation = EvaluateReply(sender="n", node_id="n", in_reply_to="x", job_id="j", round=0, dataset_id="ds",
                               sample_size=101)  # fmt: skip
    with pytest.raises(InvalidUpdate, match="claims 101 test samples but reported 100"):
        check_reply(evaluation, INFO)
