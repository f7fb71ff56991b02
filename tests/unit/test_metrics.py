"""Validation metrics (`common/metrics.py`) and how the node's trainer accumulates them over a test split.

AUC, F1 and a Dice that skips empty masks are not means of per-batch values; each case here is built so that
the per-batch mean (what the trainer computed before) differs from the value over the whole split, and the
whole-split value is checked against MONAI's own cumulative metric objects or by hand."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from monai.metrics import ConfusionMatrixMetric, DiceMetric, HausdorffDistanceMetric, ROCAUCMetric
from torch import nn
from torch.utils.data import TensorDataset

from fedsilo.common.metrics import (
    Accuracy,
    Dice,
    F1Score,
    Hausdorff95,
    MetricError,
    RocAuc,
    classification_metrics,
    segmentation_metrics,
)
from fedsilo.common.training_args import TrainingArgs
from fedsilo.common.training_plan import DataManager, TorchTrainingPlan
from fedsilo.node.config import DPPolicy, Limits
from fedsilo.node.trainer import Trainer

# Two batches of two: each batch ranks its positive first (AUC 1 per batch), the split does not (AUC 0.75).
SCORES = torch.tensor([0.1, 0.2, 0.8, 0.9])
LABELS = torch.tensor([0, 1, 0, 1])


class _Scores(TorchTrainingPlan):
    """The model is the identity: `data` are the scores; testing_step returns the three classification metrics
    and, as a plain number, the batch's AUC (what a plan could only do before: averaged per batch)."""

    def init_model(self, model_args):
        return nn.Identity()

    def training_data(self, batch_size):
        return DataManager(TensorDataset(SCORES, LABELS), batch_size=batch_size)

    def training_step(self, data, target):
        return data.sum()

    def testing_step(self, data, target):
        out = self.model()(data)
        per_batch = RocAuc.of(out, target).compute()
        return {**classification_metrics(out, target), "batch_auc": per_batch}


def _test(plan_cls: type[TorchTrainingPlan], batch_size: int) -> dict[str, float]:
    plan = plan_cls()
    plan.post_init({}, TrainingArgs(batch_size=batch_size))
    loader = plan.data_manager().loader()
    return Trainer(plan, plan.training_args, Limits(), DPPolicy()).test(loader)


def test_the_trainer_computes_auc_and_f1_over_the_whole_split_not_as_a_mean_of_batches() -> None:
    metrics = _test(_Scores, batch_size=2)
    assert metrics["batch_auc"] == 1.0  # the per-batch mean
    assert metrics["auc"] == pytest.approx(0.75)  # 3 of the 4 (positive, negative) pairs are ordered
    # Thresholded at 0.5: predictions 0, 0, 1, 1. Each class has tp 1, fp 1, fn 1 over the split: F1 0.5;
    # a batch holds one class's hit and the other's miss: per-batch macro F1 1/3.
    assert metrics["f1"] == pytest.approx(0.5)
    assert metrics["accuracy"] == pytest.approx(0.5)
    assert _test(_Scores, batch_size=4) == pytest.approx(metrics | {"batch_auc": 0.75})  # one batch: the same


def _mask(size: int, box: tuple[int, int, int, int] | None) -> torch.Tensor:
    m = torch.zeros(1, size, size)
    if box is not None:
        m[0, box[0] : box[1], box[2] : box[3]] = 1
    return m


def test_dice_skips_images_with_an_empty_mask_over_the_split_as_monais_cumulative_metric() -> None:
    # Batch 1: a perfect image and one whose ground truth is empty (undefined, skipped); batch 2: two at 0.5.
    truth = [_mask(8, (0, 4, 0, 4)), _mask(8, None), _mask(8, (0, 4, 0, 4)), _mask(8, (0, 4, 0, 4))]
    pred = [_mask(8, (0, 4, 0, 4)), _mask(8, (4, 6, 4, 6)), _mask(8, (0, 4, 0, 2)), _mask(8, (0, 2, 0, 4))]
    batches = [(torch.stack(pred[:2]), torch.stack(truth[:2])), (torch.stack(pred[2:]), torch.stack(truth[2:]))]
    merged = Dice.of(*batches[0]).merge(Dice.of(*batches[1]))
    reference = DiceMetric(include_background=True)
    for p, t in batches:
        reference(p, t)
    per_batch = [Dice.of(p, t).compute() for p, t in batches]
    assert merged.compute() == pytest.approx(float(reference.aggregate())) == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert sum(per_batch) / 2 == pytest.approx((1 + 2 / 3) / 2)  # what averaging batches gave: 0.83, not 0.78


def test_multiclass_segmentation_matches_monai_dice_and_hausdorff95_accumulated_over_batches() -> None:
    gen = torch.Generator().manual_seed(0)
    ours_dice, ours_hd = None, None
    dice, hd = DiceMetric(include_background=False), HausdorffDistanceMetric(percentile=95)
    for _ in range(3):
        logits = torch.randn(3, 3, 12, 12, generator=gen)
        labels = torch.randint(0, 3, (3, 1, 12, 12), generator=gen)
        m = segmentation_metrics(logits, labels)
        ours_dice = m["dice"] if ours_dice is None else ours_dice.merge(m["dice"])
        ours_hd = m["hausdorff95"] if ours_hd is None else ours_hd.merge(m["hausdorff95"])
        onehot_pred = nn.functional.one_hot(logits.argmax(1), 3).movedim(-1, 1).float()
        onehot_true = nn.functional.one_hot(labels[:, 0], 3).movedim(-1, 1).float()
        dice(onehot_pred, onehot_true)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hd(onehot_pred, onehot_true)
    assert isinstance(ours_hd, Hausdorff95) and isinstance(ours_dice, Dice)
    assert ours_dice.compute() == pytest.approx(float(dice.aggregate()), rel=1e-6)
    assert ours_hd.compute() == pytest.approx(float(hd.aggregate()), rel=1e-6)


def test_multiclass_auc_and_f1_match_monai_over_the_concatenated_split() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(60, 4, generator=gen)
    labels = torch.randint(0, 4, (60,), generator=gen)
    auc, f1 = RocAuc(), F1Score()
    for i in range(0, 60, 8):
        auc = auc.merge(RocAuc.of(logits[i : i + 8], labels[i : i + 8]))
        f1 = f1.merge(F1Score.of(logits[i : i + 8], labels[i : i + 8], num_classes=4))
    onehot = nn.functional.one_hot(labels, 4)
    reference_auc = ROCAUCMetric()
    reference_auc(logits.softmax(1), onehot)
    reference_f1 = ConfusionMatrixMetric(metric_name="f1 score", compute_sample=False, reduction="sum_batch")
    reference_f1(nn.functional.one_hot(logits.argmax(1), 4), onehot)
    assert auc.compute() == pytest.approx(float(reference_auc.aggregate()))
    assert f1.compute() == pytest.approx(float(reference_f1.aggregate()[0].nanmean()))  # per class, then macro
    accuracy = Accuracy.of(logits[:30], labels[:30]).merge(Accuracy.of(logits[30:], labels[30:]))
    assert accuracy.compute() == pytest.approx(float((logits.argmax(1) == labels).float().mean()))


def test_binary_auc_with_ties_over_many_batches_is_monais_value() -> None:
    gen = torch.Generator().manual_seed(2)
    scores = (torch.rand(3000, generator=gen) * 10).round() / 10  # 11 distinct values: ties everywhere
    labels = torch.randint(0, 2, (3000,), generator=gen)
    merged = RocAuc()
    for i in range(0, 3000, 7):
        merged = merged.merge(RocAuc.of(scores[i : i + 7], labels[i : i + 7]))
    reference = ROCAUCMetric()
    reference(scores, labels)
    assert merged.compute() == pytest.approx(float(reference.aggregate()), abs=1e-12)
    assert len(merged.labels) == 3000 and math.isnan(RocAuc.of(scores, labels + 1).compute())  # labels 1/2


def test_f1_averages_and_classes_seen_in_one_batch_only() -> None:
    # Batch 1 sees classes 0 and 1 only (a 2-column count), batch 2 a class 2 as well: the counts are padded.
    one = F1Score.of(torch.tensor([0, 1]), torch.tensor([0, 1]))
    two = F1Score.of(torch.tensor([2, 2]), torch.tensor([2, 0]))
    merged = one.merge(two)
    assert merged.counts.shape == (3, 4)
    # class 0: tp 1, fn 1 -> 2/3; class 1: 1; class 2: tp 1, fp 1 -> 2/3
    assert merged.compute() == pytest.approx((2 / 3 + 1 + 2 / 3) / 3)
    micro = F1Score.of(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 2, 0]), average="micro")
    assert micro.compute() == pytest.approx(0.75)  # micro F1 = accuracy for single-label classes
    binary = F1Score.of(torch.tensor([0.9, 0.2, 0.7]), torch.tensor([1, 1, 0]), average="binary")
    assert binary.compute() == pytest.approx(0.5)  # class 1: tp 1, fp 1, fn 1


def test_undefined_and_mismatched_metrics_say_so() -> None:
    single_class = RocAuc.of(torch.tensor([0.2, 0.4]), torch.tensor([1, 1])).compute()
    assert single_class != single_class  # NaN: an AUC needs both classes
    with pytest.raises(MetricError, match="cannot merge a Dice into a RocAuc"):
        RocAuc().merge(Dice())
    same = RocAuc.of(torch.tensor([0.2, 0.4]), torch.tensor([0, 1]))
    with pytest.raises(MetricError, match="merged with itself"):
        same.merge(same)
    with pytest.raises(MetricError, match="3 samples, target 2"):
        Accuracy.of(torch.zeros(3, 2), torch.zeros(2))
    with pytest.raises(MetricError, match="B x C x spatial"):
        Dice.of(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(MetricError, match="average must be"):
        F1Score.of(torch.zeros(2, 2), torch.zeros(2), average="weighted")


def test_the_validation_views_show_each_node_and_the_weighted_federation_and_survive_a_breakpoint() -> None:
    from fedsilo.researcher.algorithms import FedAverage
    from fedsilo.researcher.evaluation import round_evaluation
    from fedsilo.researcher.history import FEDERATION, History, NodeResult, RoundRecord
    from fedsilo.researcher.strategies import Drop

    nodes = {
        "a": NodeResult("a", "hospital-a", sample_size=30, metrics={"loss": 1.0, "test_auc": 0.9}, test_samples=10,
                        device={"used": "cpu", "gpu_requested": True, "fallback": "none here"}),
        "b": NodeResult("b", "hospital-b", sample_size=90, metrics={"loss": 2.0, "test_auc": 0.5}, test_samples=30),
        "c": NodeResult("c", "hospital-c", dropped=Drop("c", "timeout", "no reply")),
    }  # fmt: skip
    record = RoundRecord(0, nodes, {})
    history = History()
    history.add(record, round_evaluation(record, FedAverage()))
    restored = History()
    restored.load_state(history.state())
    for h in (history, restored):
        assert h.validation_metrics("test_auc") == {0: {"hospital-a": 0.9, "hospital-b": 0.5, FEDERATION: 0.6}}
        assert h.validation_metrics()[0]["hospital-a"] == {"test_auc": 0.9}  # evaluation metrics only
        rows = [line.split() for line in h.metrics_table(per="validation").splitlines()[2:]]
        assert rows == [["0", "hospital-a", "10", "0.9"], ["0", "hospital-b", "30", "0.5"],
                        ["0", "all", "nodes", "40", "0.6"]]  # fmt: skip
        assert h.replies[0]["a"]["device"]["fallback"] == "none here" and "device" not in h.replies[0]["b"]
