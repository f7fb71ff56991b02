"""Validation metrics a plan's `testing_step` returns, exact over a whole test split.

A node tests a model batch by batch, but AUC, F1 and a Dice that skips empty masks are not means of
per-batch values: the AUC of two batches is not the mean of their AUCs. So `testing_step` may return,
besides plain numbers (the node averages those weighted by the batch's samples, as before), a `Metric`:
the batch's *sufficient statistics*. The node merges one metric's statistics over every batch
(`merge`) and computes the value once at the end (`compute`), which equals the metric over the whole
split. What leaves the node is that one number per metric (never the statistics: scores and masks are
patient data).

    from fedsilo.common.metrics import classification_metrics, segmentation_metrics

    def testing_step(self, data, target):
        out = self.model()(data)
        return {"loss": float(F.cross_entropy(out, target)), **classification_metrics(out, target)}
        # -> accuracy, f1 (macro), auc (macro one-vs-rest) over the node's whole test split

    def testing_step(self, data, target):          # segmentation: logits B x C x H x W (x D), target B x 1 x ...
        return segmentation_metrics(self.model()(data), target)   # -> dice, hausdorff95 (mean over images)

The computations are MONAI's (`get_confusion_matrix` + `compute_confusion_matrix_metric`, `compute_dice`,
`compute_hausdorff_distance(percentile=95)`; the AUC is `compute_roc_auc`'s value in a vectorised form, tested
against it: MONAI's loops in Python over the samples); MONAI is imported at the first use, because
importing `monai.metrics` costs 2-8 s on the 2-core dev machine and node CLI commands import this package.
The researcher's federation value of each metric is the mean of the nodes' values weighted by their test
splits (`researcher.algorithms.weighted_means`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "Accuracy",
    "Dice",
    "F1Score",
    "Hausdorff95",
    "Metric",
    "MetricError",
    "RocAuc",
    "classification_metrics",
    "segmentation_metrics",
]


class MetricError(ValueError):
    """Two batches' statistics cannot be merged, or a batch's tensors do not fit the metric."""


class Metric:
    """One batch's sufficient statistics for a metric: `merge` adds another batch's, `compute` gives the value
    over every batch merged so far (NaN when undefined, e.g. an AUC over a single class).

        m = RocAuc.of(scores_batch_1, labels_1).merge(RocAuc.of(scores_batch_2, labels_2))
        m.compute()    # the AUC over both batches, not the mean of two AUCs
    """

    def merge(self, other: Metric) -> Metric:
        raise NotImplementedError

    def compute(self) -> float:
        raise NotImplementedError

    def _same(self, other: Metric) -> None:
        if type(other) is not type(self):
            raise MetricError(f"cannot merge a {type(other).__name__} into a {type(self).__name__}")


def _labels(output: torch.Tensor, threshold: float) -> torch.Tensor:
    """Class labels from scores (N x C: argmax; N or N x 1: above `threshold`) or from labels."""
    output = output.detach()
    if output.is_floating_point():
        if output.ndim == 2 and output.shape[1] > 1:
            return output.argmax(dim=1)
        return (output.reshape(-1) > threshold).long()
    return output.reshape(-1).long()


def _num_classes(output: torch.Tensor, *labels: torch.Tensor) -> int:
    if output.ndim == 2 and output.shape[1] > 1:
        return int(output.shape[1])
    return max([2, *(int(t.max()) + 1 for t in labels if t.numel())])


def _check_batch(output: torch.Tensor, target: torch.Tensor) -> None:
    if not isinstance(output, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise MetricError("metrics take tensors: output and target")
    if output.shape[0] != target.shape[0]:
        raise MetricError(f"output has {output.shape[0]} samples, target {target.shape[0]}")


@dataclass
class Accuracy(Metric):
    """Correct predictions over samples. `Accuracy.of(output, target)`: output N x C scores (argmax), or N
    probabilities (above `threshold`), or N labels; target N labels."""

    correct: int = 0
    total: int = 0

    @classmethod
    def of(cls, output: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> Accuracy:
        _check_batch(output, target)
        truth = target.detach().reshape(-1).long()
        return cls(int((_labels(output, threshold) == truth).sum()), int(truth.numel()))

    def merge(self, other: Metric) -> Accuracy:
        self._same(other)
        assert isinstance(other, Accuracy)
        return Accuracy(self.correct + other.correct, self.total + other.total)

    def compute(self) -> float:
        return self.correct / self.total if self.total else math.nan


@dataclass
class F1Score(Metric):
    """F1 from a confusion matrix summed over batches (`counts`: C x [tp, fp, tn, fn], MONAI's layout).
    `average`: "macro" (the mean of the classes' F1, classes never seen nor predicted left out), "micro", or
    "binary" (class 1's F1).

        F1Score.of(logits, labels, average="micro").merge(F1Score.of(logits_2, labels_2, average="micro")).compute()
    """

    counts: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 4))
    average: str = "macro"

    @classmethod
    def of(cls, output: torch.Tensor, target: torch.Tensor, num_classes: int | None = None,
           average: str = "macro", threshold: float = 0.5) -> F1Score:  # fmt: skip
        from monai.metrics import get_confusion_matrix

        if average not in ("macro", "micro", "binary"):
            raise MetricError(f"average must be 'macro', 'micro' or 'binary', not {average!r}")
        _check_batch(output, target)
        pred, truth = _labels(output, threshold), target.detach().reshape(-1).long()
        classes = num_classes or _num_classes(output, pred, truth)
        onehot = torch.nn.functional.one_hot
        counts = get_confusion_matrix(onehot(pred, classes).float(), onehot(truth, classes).float())
        return cls(counts.sum(dim=0).float(), average)

    def merge(self, other: Metric) -> F1Score:
        self._same(other)
        assert isinstance(other, F1Score)
        if other.average != self.average:
            raise MetricError(f"cannot merge a {other.average} F1 into a {self.average} F1")
        a, b = self.counts, other.counts
        size = max(a.shape[0], b.shape[0])
        pad = torch.nn.functional.pad
        return F1Score(pad(a, (0, 0, 0, size - a.shape[0])) + pad(b, (0, 0, 0, size - b.shape[0])), self.average)

    def compute(self) -> float:
        from monai.metrics import compute_confusion_matrix_metric

        if self.counts.shape[0] == 0:
            return math.nan
        if self.average == "micro":
            return float(compute_confusion_matrix_metric("f1 score", self.counts.sum(dim=0, keepdim=True))[0])
        per_class = compute_confusion_matrix_metric("f1 score", self.counts)
        if self.average == "binary":
            return float(per_class[1]) if per_class.numel() > 1 else math.nan
        return float(per_class.nanmean())


class RocAuc(Metric):
    """Area under the ROC curve over every sample merged (the scores and labels are kept: an exact AUC needs
    them; they stay on the node). `RocAuc.of(output, target)`: output N or N x 1 scores of the positive class,
    or N x C class scores (softmax applied when `logits`; one-vs-rest, macro average as MONAI's
    `ROCAUCMetric`; for C = 2 the AUC of class 1); target N labels.

        auc = RocAuc.of(logits_1, labels_1).merge(RocAuc.of(logits_2, labels_2)).compute()

    `merge` appends the other batch's chunk to this object and returns it: concatenating at each merge made
    a 100,000-sample split in batches of 32 take 71 s (quadratic copying) on the loaded 2-core dev machine."""

    def __init__(self, scores: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> None:
        self._chunks: list[tuple[torch.Tensor, torch.Tensor]] = []
        if scores is not None and labels is not None and scores.numel():
            self._chunks.append((scores, labels))

    @classmethod
    def of(cls, output: torch.Tensor, target: torch.Tensor, logits: bool = True) -> RocAuc:
        _check_batch(output, target)
        scores = output.detach().float().cpu()
        if scores.ndim == 2 and scores.shape[1] > 1:
            if logits:
                scores = scores.softmax(dim=1)
            if scores.shape[1] == 2:
                scores = scores[:, 1]
        else:
            scores = scores.reshape(-1)
        return cls(scores, target.detach().reshape(-1).long().cpu())

    @property
    def scores(self) -> torch.Tensor:
        return torch.cat([s for s, _ in self._chunks]) if self._chunks else torch.zeros(0)

    @property
    def labels(self) -> torch.Tensor:
        return torch.cat([t for _, t in self._chunks]) if self._chunks else torch.zeros(0, dtype=torch.long)

    def merge(self, other: Metric) -> RocAuc:
        self._same(other)
        assert isinstance(other, RocAuc)
        if other is self:  # a plan returning one object for every batch would count each batch again and again
            raise MetricError("a RocAuc merged with itself: return a new RocAuc.of(...) for each batch")
        for scores, labels in other._chunks:
            if self._chunks and scores.shape[1:] != self._chunks[0][0].shape[1:]:
                raise MetricError(f"AUC scores of shape {tuple(scores.shape[1:])} and "
                                  f"{tuple(self._chunks[0][0].shape[1:])}")  # fmt: skip
            self._chunks.append((scores, labels))
        return self

    def compute(self) -> float:
        """MONAI's `compute_roc_auc` value (macro: the mean over the classes, NaN when one is undefined), in a
        vectorised form: MONAI loops in Python over the samples, 11 s for 100,000 on the loaded dev machine."""
        scores, labels = self.scores, self.labels
        if scores.ndim == 1:
            return _binary_auc(scores, labels)
        if labels.numel() and (labels.min() < 0 or labels.max() >= scores.shape[1]):
            return math.nan
        return sum(_binary_auc(scores[:, c], (labels == c).long()) for c in range(scores.shape[1])) / scores.shape[1]


def _binary_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """The Mann-Whitney form of the AUC (ties count half, as MONAI's `_calculate`): from the positives' average
    ranks. NaN when the labels are not 0/1 or hold one class only (MONAI says NaN there too)."""
    positives = int((labels == 1).sum())
    negatives = int((labels == 0).sum())
    if positives == 0 or negatives == 0 or positives + negatives != labels.numel():
        return math.nan
    ordered, order = scores.double().sort()
    _, group, counts = torch.unique_consecutive(ordered, return_inverse=True, return_counts=True)
    average_rank = counts.cumsum(0).double() - (counts.double() - 1) / 2  # 1-based, ties share their mean rank
    rank_sum = average_rank[group][labels[order] == 1].sum()
    return float((rank_sum - positives * (positives + 1) / 2) / (positives * negatives))


def _segmentation_onehot(output: torch.Tensor, target: torch.Tensor, threshold: float) -> tuple[torch.Tensor, ...]:
    """(prediction, truth) as B x C x spatial binary masks: output C > 1 channels -> argmax; one channel
    -> above `threshold` (give probabilities); target B x 1 x spatial labels, or one-hot like the output."""
    _check_batch(output, target)
    output, target = output.detach(), target.detach()
    if output.ndim < 3:
        raise MetricError(f"segmentation output must be B x C x spatial, got shape {tuple(output.shape)}")
    channels = output.shape[1]
    if channels == 1:
        pred = (output > threshold).float() if output.is_floating_point() else output.float()
        return pred, (target > 0).float()
    pred = torch.nn.functional.one_hot(output.argmax(dim=1), channels).movedim(-1, 1).float()
    if target.shape[1] == 1:
        target = torch.nn.functional.one_hot(target[:, 0].long(), channels).movedim(-1, 1)
    if target.shape != pred.shape:
        raise MetricError(f"target of shape {tuple(target.shape)} does not fit output {tuple(pred.shape)}")
    return pred, target.float()


@dataclass
class _PerImageMean(Metric):
    """A per-image value averaged over the images where it is defined: (sum, images) over batches. The value
    of one image is the mean over its classes (MONAI's `reduction="mean"`: channels first, then the batch)."""

    total: float = 0.0
    images: int = 0

    @classmethod
    def _from(cls, values: torch.Tensor) -> Any:
        """`values`: B x C per image and class, NaN/inf where undefined (an empty mask)."""
        values = values.float().masked_fill(~torch.isfinite(values.float()), math.nan)
        per_image = values.nanmean(dim=1)
        ok = torch.isfinite(per_image)
        return cls(float(per_image[ok].sum()), int(ok.sum()))

    def merge(self, other: Metric) -> Any:
        self._same(other)
        assert isinstance(other, _PerImageMean)
        return type(self)(self.total + other.total, self.images + other.images)

    def compute(self) -> float:
        return self.total / self.images if self.images else math.nan


class Dice(_PerImageMean):
    """Mean Dice over the images (MONAI `DiceMetric(reduction="mean", ignore_empty=True)` accumulated over the
    whole split: an image whose ground truth is empty in every class counts for nothing).

        Dice.of(logits, mask)          # logits B x C x H x W (x D); mask B x 1 x ... labels (or one-hot)
    """

    @classmethod
    def of(cls, output: torch.Tensor, target: torch.Tensor, include_background: bool = False,
           threshold: float = 0.5) -> Dice:  # fmt: skip
        from monai.metrics import compute_dice

        pred, truth = _segmentation_onehot(output, target, threshold)
        background = include_background or pred.shape[1] == 1
        return cls._from(compute_dice(pred, truth, include_background=background, ignore_empty=True))


class Hausdorff95(_PerImageMean):
    """Mean 95th-percentile Hausdorff distance over the images where both masks are non-empty (MONAI
    `compute_hausdorff_distance(percentile=95)`; in voxels, or in `spacing` units).

        Hausdorff95.of(logits, mask, spacing=(1.0, 1.0, 3.0))
    """

    @classmethod
    def of(cls, output: torch.Tensor, target: torch.Tensor, include_background: bool = False,
           spacing: float | Sequence[float] | None = None, threshold: float = 0.5) -> Hausdorff95:  # fmt: skip
        from monai.metrics import compute_hausdorff_distance

        pred, truth = _segmentation_onehot(output, target, threshold)
        background = include_background or pred.shape[1] == 1
        with warnings.catch_warnings():  # MONAI warns per empty mask and about its own deprecated argument
            warnings.simplefilter("ignore")
            values = compute_hausdorff_distance(pred, truth, include_background=background, percentile=95,
                                                spacing=spacing)  # fmt: skip
        return cls._from(torch.as_tensor(values))


def classification_metrics(output: torch.Tensor, target: torch.Tensor, num_classes: int | None = None,
                           logits: bool = True) -> dict[str, Metric]:  # fmt: skip
    """`accuracy`, `f1` (macro) and `auc` (macro one-vs-rest) of one batch, for `testing_step` to return.

        return {"loss": float(loss), **classification_metrics(self.model()(data), target)}
    """
    return {
        "accuracy": Accuracy.of(output, target),
        "f1": F1Score.of(output, target, num_classes=num_classes),
        "auc": RocAuc.of(output, target, logits=logits),
    }


def segmentation_metrics(output: torch.Tensor, target: torch.Tensor, include_background: bool = False,
                         spacing: float | Sequence[float] | None = None) -> dict[str, Metric]:  # fmt: skip
    """`dice` and `hausdorff95` of one batch (means over images), for `testing_step` to return.

        return segmentation_metrics(self.model()(image), mask)
    """
    return {
        "dice": Dice.of(output, target, include_background=include_background),
        "hausdorff95": Hausdorff95.of(output, target, include_background=include_background, spacing=spacing),
    }
