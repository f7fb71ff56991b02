"""A round as named stages, and the one table that turns their exceptions into error codes.

Each stage is a small function; `run_stages` runs them in order and maps whatever one raises through
`ERRORS` (the exception's type, its most specific class first) to `(ErrorCode, stage)`. A stage named
`None` in the table is the failing stage's own `label`: the same `TransferError` is `plan_download`
in one stage and `upload` in another. An exception the table does not name gets the stage's
`fallback` code (plan code can raise anything). `label` is what the ErrorReply's `stage` says, and
what researchers and tests read; `name` is the function's.

What leaves the node is released on purpose: a failure's message is the exception's own text only when
fedsilo's code raised it (a `FedsiloError` whose innermost frame and explicit cause are fedsilo's), else
"the plan raised <type>" (`released_text`): plan code can put a file's content or a secret in an exception,
and a type of its own can be named anything. The full text and traceback go to node.log under the request
id and an error id that the reply's message repeats.

This module imports no torch: the daemon's message handlers use the table too.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
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
from .datasets import DatasetError, DatasetTooSmall, UnknownDataset
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
    DatasetTooSmall: (ErrorCode.DATASET_TOO_SMALL, "dataset_load"),
    DatasetError: (ErrorCode.DATASET_LOAD_FAILED, "dataset_load"),
    UpdateRefused: (ErrorCode.PARAMS_INVALID, "update"),
    SerializationError: (ErrorCode.PARAMS_INVALID, "params"),
    NonFiniteError: (ErrorCode.NON_FINITE, None),
    DPRequestRefused: (ErrorCode.DP_REQUEST_REFUSED, "arguments"),
    BudgetExceeded: (ErrorCode.PRIVACY_BUDGET_EXCEEDED, "privacy_budget"),
    MemoryError: (ErrorCode.RESOURCE_LIMIT, None),  # in the sandbox: past [limits] sandbox_memory_mb
}
"""Exception type -> (code, stage or None for the failing stage's label)."""

REFUSALS = frozenset({ErrorCode.PLAN_NOT_APPROVED, ErrorCode.PLAN_REJECTED, ErrorCode.UNKNOWN_DATASET,
                      ErrorCode.DP_REQUEST_REFUSED, ErrorCode.PRIVACY_BUDGET_EXCEEDED, ErrorCode.DATASET_TOO_SMALL})
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


def failure(exc: BaseException, label: str, fallback: ErrorCode, error_id: str = "") -> RoundFailure:
    """The RoundFailure an exception raised in a stage becomes, its message released on purpose (a
    RoundFailure that fedsilo's code raised stays as it is). `error_id`, when given, ends the message."""
    if isinstance(exc, RoundFailure) and _fedsilo_raised(exc):
        return exc
    code, where = classify(exc, label, fallback)
    text = released_text(exc)
    if error_id:
        text += f" (error {error_id}: the node's log holds the details)"
    return RoundFailure(code, text, where)


def released_text(exc: BaseException) -> str:
    """What a reply may say about `exc`: its own text when fedsilo's code raised it and caused it, else only
    its type (a builtin's or fedsilo's name; "an exception of the plan's own" for any other)."""
    if isinstance(exc, FedsiloError) and f"{exc}" and _fedsilo_raised(exc):
        cause = exc.__cause__
        if cause is None or (isinstance(cause, FedsiloError) and _fedsilo_raised(cause)):
            return f"{exc}"
    kind = type(exc)
    if kind.__module__ == "builtins" or kind.__module__.startswith(("fedsilo.", "torch.")):
        name = kind.__qualname__
    else:
        name = "an exception of the plan's own"
    what = {MemoryError: " (past the round's memory limit)"}.get(kind, "")  # type: ignore[call-overload]
    return f"the plan raised {name}{what}"


def new_error_id() -> str:
    """A short id that ties an error reply to its lines in node.log."""
    return "E" + secrets.token_hex(4)


def run_stages(stages: Sequence[Stage], state: Any, request_id: str = "",
               timings: dict[str, float] | None = None) -> None:  # fmt: skip
    """Run `stages` in order on `state`; the first failure is raised as a `RoundFailure` and logged
    (a refusal as a warning, anything else as an error with its full text and traceback, under an error id
    that the reply's message names). `timings`, when given, gets each stage's wall seconds by name: the reply
    carries them, so a researcher (and `bench/`) sees where a node's round went."""
    for st in stages:
        t0 = time.perf_counter()
        try:
            st.fn(state)
            if timings is not None:
                timings[st.name] = timings.get(st.name, 0.0) + time.perf_counter() - t0
        except Exception as exc:
            error_id = new_error_id()
            fail = failure(exc, st.label, st.fallback, error_id)
            if fail.code in REFUSALS:
                log.warning("[%s] round refused at %s: %s", request_id, st.name, fail.message)
            else:
                log.error("[%s] round failed at %s (%s) [error %s]: %s: %s", request_id, st.name, fail.stage,
                          error_id, type(exc).__name__, exc, exc_info=True)  # fmt: skip
            raise fail from exc


_FEDSILO_DIRS = tuple(os.path.dirname(os.path.dirname(os.path.realpath(__file__))) + os.sep + d + os.sep
                      for d in ("common", "network", "node"))  # fmt: skip
"""fedsilo's own source folders (an installed package keeps the same three names)."""


def _fedsilo_raised(exc: BaseException) -> bool:
    """Whether the innermost frame of `exc`'s traceback (where `raise` ran) is fedsilo's code. Plan code
    compiles under a name like `<fedsilo-plan ...>`, so a plan raising fedsilo's own exception types
    with a secret in them is told apart; an exception never raised (no traceback) counts as fedsilo's."""
    tb = exc.__traceback__
    if tb is None:
        return True
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.realpath(tb.tb_frame.f_code.co_filename).startswith(_FEDSILO_DIRS)
