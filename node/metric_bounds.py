"""What a plan's metrics may be when they leave the node: numbers, a bounded count, short names.

`testing_step` is plan code: it can return NaN, a string, a tensor of ten million entries or a dict of a
million keys. Reply messages are capped at 256 KiB and the researcher's table and TensorBoard show every
key, so the node keeps at most `[limits] max_metrics` metrics of at most `max_metric_name` printable
characters, each one finite number, and says in a WARNING what it left out and why. The update itself
still counts: a bad metric never fails a round.

    acc = MetricsAccumulator(limits.max_metrics, limits.max_metric_name)
    for batch ...: acc.add(plan.testing_step(data, target), samples=len(target))
    metrics, warnings = acc.result(), acc.warnings()

Accumulation over batches (`docs/internals.md`, evaluation): a plain number is averaged weighted by its
batch's samples; a `fedsilo.common.metrics.Metric` (sufficient statistics) is merged over the batches and
computed once, so that AUC, F1 and Dice are those of the whole split, not means of per-batch values.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from itertools import islice
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import Limits

if TYPE_CHECKING:  # common.metrics computes on tensors: imported where a plan's metrics are (the worker)
    from fedsilo.common.metrics import Metric

REPLY_OWN_METRICS = 16
"""Room for the trainer's own metrics (loss, last_loss, steps, epochs, samples_seen, skipped_batches, epsilon,
...) in a reply, besides the plan's `test_*` and `global_*` ones."""

SHOWN_NAMES = 3
"""Names quoted per reason in a warning (a million bad keys make one short line, not a million)."""


def _name_ok(name: Any, max_name: int) -> bool:
    return isinstance(name, str) and 0 < len(name) <= max_name and name.isprintable()


def _quote(name: Any) -> str:
    text = repr(name)
    return text if len(text) <= 40 else text[:37] + "..."


def as_number(value: Any) -> float | str:
    """`value` as a float, or why it is not one number (no copy of a large tensor or array is made)."""
    if isinstance(value, bool | np.bool_):
        return "a bool, not a number"
    if isinstance(value, int | float | np.integer | np.floating):
        return float(value)
    torch = sys.modules.get("torch")  # a tensor comes from a process that imported torch; the daemon does not
    if isinstance(value, np.ndarray) or (torch is not None and isinstance(value, torch.Tensor)):
        size = value.size if isinstance(value, np.ndarray) else value.numel()
        if size != 1:
            return f"a {type(value).__name__} of {size} elements, not one number"
        if not isinstance(value, np.ndarray) and (value.is_complex() or value.dtype == torch.bool):
            return f"a {value.dtype} tensor, not a real number"
        try:
            return float(value.reshape(-1)[0])
        except (TypeError, ValueError) as exc:
            return f"a {type(value).__name__} that is not a number ({exc})"[:200]
    return f"a {type(value).__name__}, not a number"


class _Reasons:
    """Left-out names grouped by reason: a count and the first few names of each."""

    def __init__(self) -> None:
        self.names: dict[str, list[str]] = {}
        self.counts: dict[str, int] = {}

    def add(self, reason: str, name: Any, count: int = 1) -> None:
        shown = self.names.setdefault(reason, [])
        if len(shown) < SHOWN_NAMES and _quote(name) not in shown:
            shown.append(_quote(name))
        self.counts[reason] = self.counts.get(reason, 0) + count

    def lines(self, what: str) -> list[str]:
        out = []
        for reason, names in self.names.items():
            more = self.counts[reason] - len(names)
            listed = ", ".join(names) + (f" and {more} more" if more > 0 else "")
            out.append(f"{what} left out: {listed}: {reason}")
        return out


class MetricsAccumulator:
    """The outputs of `testing_step` over a test split, folded into bounded numbers.

        acc = MetricsAccumulator(max_metrics=32, max_name=64)
        acc.add({"loss": 0.3, "auc": RocAuc.of(scores, labels)}, samples=8)
        acc.result()     # {"loss": ..., "auc": ...}; acc.warnings() says what was left out
    """

    def __init__(self, max_metrics: int, max_name: int) -> None:
        self.max_metrics = max_metrics
        self.max_name = max_name
        self._sums: dict[str, float] = {}
        self._weights: dict[str, int] = {}
        self._stats: dict[str, Metric] = {}
        self._dropped: set[str] = set()  # a name refused once stays out: its value would cover part of the split
        self._reasons = _Reasons()

    @classmethod
    def for_limits(cls, limits: Limits) -> MetricsAccumulator:
        return cls(limits.max_metrics, limits.max_metric_name)

    def _known(self, name: str) -> bool:
        return name in self._sums or name in self._stats

    def add(self, out: Any, samples: int) -> None:
        """One batch's output (`None` = nothing to report for this batch)."""
        if out is None:
            return
        if not isinstance(out, Mapping):
            self._reasons.add(f"testing_step returned a {type(out).__name__}, not a dict of metrics", "(the output)")
            return
        total = len(out)
        for name, value in islice(out.items(), self.max_metrics):
            self._add_one(name, value, samples)
        if total > self.max_metrics:
            reason = self._over_cap(total)
            for name in islice(out.keys(), self.max_metrics, self.max_metrics + SHOWN_NAMES):
                self._reasons.add(reason, name, 0)
            self._reasons.counts[reason] = total - self.max_metrics  # per batch, not summed over the batches

    def _over_cap(self, total: int) -> str:
        return f"testing_step returned {total} metrics, more than [limits] max_metrics = {self.max_metrics}"

    def _add_one(self, name: Any, value: Any, samples: int) -> None:
        if not _name_ok(name, self.max_name):
            self._reasons.add(f"a metric's name must be text of 1 to {self.max_name} printable characters", name)
            return
        if name in self._dropped:
            return
        if not self._known(name) and len(self._sums) + len(self._stats) + len(self._dropped) >= self.max_metrics:
            self._reasons.add(f"more than [limits] max_metrics = {self.max_metrics} distinct metrics", name)
            return
        from fedsilo.common.metrics import Metric  # the accumulator runs in the worker; the daemon never gets here

        if isinstance(value, Metric):
            self._merge(name, value)
            return
        number = as_number(value)
        if isinstance(number, str) or name in self._stats:
            self._refuse(name, number if isinstance(number, str) else "a Metric in one batch, a number in another")
            return
        self._sums[name] = self._sums.get(name, 0.0) + number * samples
        self._weights[name] = self._weights.get(name, 0) + samples

    def _merge(self, name: str, value: Metric) -> None:
        if name in self._sums:
            self._refuse(name, "a number in one batch, a Metric in another")
            return
        try:
            self._stats[name] = value if name not in self._stats else self._stats[name].merge(value)
        except Exception as exc:  # plan code (a Metric subclass, tensors of the wrong shape)
            self._refuse(name, f"its batches could not be merged ({type(exc).__name__}: {str(exc)[:120]})")

    def _refuse(self, name: str, reason: str) -> None:
        self._reasons.add(reason, name)
        self._dropped.add(name)
        self._sums.pop(name, None)
        self._weights.pop(name, None)
        self._stats.pop(name, None)

    def result(self) -> dict[str, float]:
        """Each metric over every batch: finite numbers only (the others are left out, with a reason)."""
        out: dict[str, float] = {}
        for name, total in self._sums.items():
            if self._weights[name]:
                out[name] = total / self._weights[name]
        for name, stats in self._stats.items():
            try:
                value = as_number(stats.compute())
            except Exception as exc:
                value = f"computing it failed ({type(exc).__name__}: {str(exc)[:120]})"
            if isinstance(value, str):
                self._refuse(name, value)
            else:
                out[name] = value
        for name in [n for n, v in out.items() if not math.isfinite(v)]:
            self._refuse(name, f"not finite ({out.pop(name)})")
        return out

    def warnings(self) -> list[str]:
        """One line per reason something was left out (call after `result`)."""
        return self._reasons.lines("test metrics")


def bound_reply_metrics(metrics: Mapping[str, float], limits: Limits) -> tuple[dict[str, float], list[str]]:
    """The daemon's check of a worker's metrics before they go into a reply: the worker runs plan code and
    may send anything its socket carries, so the bounds are applied again (the plan's metrics appear twice,
    as `test_*` and `global_*`, beside the trainer's own)."""
    cap = 2 * limits.max_metrics + REPLY_OWN_METRICS
    longest = limits.max_metric_name + len("global_")
    kept: dict[str, float] = {}
    reasons = _Reasons()
    for name, value in islice(metrics.items(), cap):
        number = as_number(value)
        if not _name_ok(name, longest):
            reasons.add(f"a name must be text of 1 to {longest} printable characters", name)
        elif isinstance(number, str) or not math.isfinite(number):
            reasons.add(number if isinstance(number, str) else "not finite", name)
        else:
            kept[name] = number
    if len(metrics) > cap:
        reasons.add(f"{len(metrics)} metrics, more than {cap}", "(the rest)", len(metrics) - cap)
    return kept, reasons.lines("reply metrics")
