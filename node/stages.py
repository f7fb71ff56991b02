"""A round as named stages, and the one table that turns their exceptions into error codes.

Each stage is a small function; `run_stages` runs them in order and maps whatever one raises through
`ERRORS` (the exception's type, its most specific class first) to `(ErrorCode, stage)`. A stage named
`None` in the table is the failing stage's own `label`: the same `TransferError` is `plan_download`
in one stage and `upload` in another. An exception the table does not name gets the stage's
`fallback` code (plan code can raise anything). `label` is what the ErrorReply's `stage` says, and
what researchers and tests read; `name` is the function's.

This module imports no torch: the daemon's message handlers use the table too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from fedsilo.common.algorithms import AlgorithmError
from fedsilo.common.errors import (
    ErrorCode,
    FedsiloError,
    NonFiniteError,
    PlanHashMismatch,
    PlanNotApproved,
    PlanNotText,
    PlanRejected,
    PlanSourceError,
    SerializationError,
    TransferError,
    UpdateRefused,
)
from fedsilo.common.training_args import TrainingArgsError

from .budget import BudgetExceeded
from .datasets import DatasetError, UnknownDataset
from .dp_policy import DPRequestRefused

log = logging.getLogger("fedsilo.node.stages")

S = TypeVar("S")

ERRORS: dict[type[BaseException], tuple[ErrorCode, str | None]] = {
    TransferError: (ErrorCode.TRANSFER_FAILED, None),
    PlanHashMismatch: (ErrorCode.PLAN_HASH_MISMATCH, "plan_check"),
    PlanNotText: (ErrorCode.PLAN_INVALID, "plan_check"),
    PlanSourceError: (ErrorCode.PLAN_INVALID, None),
    PlanNotApproved: (ErrorCode.PLAN_NOT_APPROVED, "plan_check"),
    PlanRejected: (ErrorCode.PLAN_REJECTED, "plan_check"),
    TrainingArgsError: (ErrorCode.TRAINING_ARGS_INVALID, "arguments"),
    AlgorithmError: (ErrorCode.TRAINING_ARGS_INVALID, "arguments"),
    UnknownDataset: (ErrorCode.UNKNOWN_DATASET, "dataset_load"),
    DatasetError: (ErrorCode.DATASET_LOAD_FAILED, "dataset_load"),
    UpdateRefused: (ErrorCode.PARAMS_INVALID, "update"),
    SerializationError: (ErrorCode.PARAMS_INVALID, "params"),
    NonFiniteError: (ErrorCode.NON_FINITE, None),
    DPRequestRefused: (ErrorCode.DP_REQUEST_REFUSED, "arguments"),
    BudgetExceeded: (ErrorCode.PRIVACY_BUDGET_EXCEEDED, "privacy_budget"),
}
"""Exception type -> (code, stage or None for the failing stage's label)."""

REFUSALS = frozenset({ErrorCode.PLAN_NOT_APPROVED, ErrorCode.PLAN_REJECTED, ErrorCode.UNKNOWN_DATASET,
                      ErrorCode.DP_REQUEST_REFUSED, ErrorCode.PRIVACY_BUDGET_EXCEEDED})
"""Decisions of the node, logged as warnings without a traceback; every other failure is an error."""


class RoundFailure(FedsiloError):
    """A round stops at a stage; becomes an ErrorReply."""

    def __init__(self, code: ErrorCode, message: str, stage: str) -> None:
        super().__init__(message)
        self.code, self.message, self.stage = code, message, stage


@dataclass(frozen=True)
class Stage:
    """One named step of a round: `fn(state)`; `label` and `fallback` say how its failures read."""

    name: str
    label: str
    fallback: ErrorCode
    fn: Callable[[Any], None]


def stage(label: str, fallback: ErrorCode) -> Callable[[Callable[[S], None]], Stage]:
    """Decorator: a function becomes a `Stage` named after it."""

    def wrap(fn: Callable[[S], None]) -> Stage:
        return Stage(fn.__name__, label, fallback, fn)

    return wrap


def classify(exc: BaseException, label: str, fallback: ErrorCode) -> tuple[ErrorCode, str]:
    """(code, stage) for an exception raised in a stage labelled `label`."""
    for cls in type(exc).__mro__:
        if cls in ERRORS:
            code, where = ERRORS[cls]
            return code, where or label
    return fallback, label


def failure(exc: BaseException, label: str, fallback: ErrorCode) -> RoundFailure:
    """The RoundFailure an exception raised in a stage becomes (a RoundFailure stays as it is)."""
    if isinstance(exc, RoundFailure):
        return exc
    code, where = classify(exc, label, fallback)
    text = f"{exc}" if isinstance(exc, FedsiloError) and f"{exc}" else f"{type(exc).__name__}: {exc}"
    return RoundFailure(code, text, where)


def run_stages(stages: Sequence[Stage], state: Any, request_id: str = "") -> None:
    """Run `stages` in order on `state`; the first failure is raised as a `RoundFailure` and logged
    (a refusal as a warning, anything else as an error with its traceback)."""
    for st in stages:
        try:
            st.fn(state)
        except Exception as exc:
            fail = failure(exc, st.label, st.fallback)
            if fail.code in REFUSALS:
                log.warning("[%s] round refused at %s: %s", request_id, st.name, fail.message)
            else:
                log.error("[%s] round failed at %s (%s): %s", request_id, st.name, fail.stage, fail.message,
                          exc_info=True)  # fmt: skip
            raise fail from exc
