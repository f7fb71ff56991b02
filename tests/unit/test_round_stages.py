"""A round as named stages (node/round.py, node/daemon_round.py) and the one exception table (node/stages.py)."""

from __future__ import annotations

import pytest

from fedsilo.common.algorithms import AlgorithmError
from fedsilo.common.errors import (
    ErrorCode,
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
from fedsilo.node import daemon_round, round
from fedsilo.node.datasets import DatasetError, UnknownDataset
from fedsilo.node.stages import RoundFailure, classify, run_stages, stage


def _in_order(names: list[str], expected: list[str]) -> bool:
    it = iter(names)
    return all(name in it for name in expected)


def test_the_round_is_a_list_of_named_stages() -> None:
    assert _in_order([s.name for s in daemon_round.BEFORE_WORKER],
                     ["fetch_plan", "check_approval", "cap_args", "load_dataset", "load_params", "stage_state"])
    assert _in_order([s.name for s in round.WORKER_STAGES],
                     ["load_plan", "check_loop", "load_params", "build_plan", "set_params", "load_data", "train",
                      "evaluate", "package"])  # fmt: skip
    assert _in_order([s.name for s in daemon_round.AFTER_WORKER], ["protect", "upload", "keep_state"])


# (stage, exception) -> (code, stage in the ErrorReply): the pairs researchers and the e2e tests rely on
CASES = [
    (daemon_round.fetch_plan, TransferError("503"), ErrorCode.TRANSFER_FAILED, "plan_download"),
    (daemon_round.fetch_plan, PlanHashMismatch("x"), ErrorCode.PLAN_HASH_MISMATCH, "plan_check"),
    (daemon_round.fetch_plan, PlanNotText("x"), ErrorCode.PLAN_INVALID, "plan_check"),
    (daemon_round.check_approval, PlanNotApproved("x"), ErrorCode.PLAN_NOT_APPROVED, "plan_check"),
    (daemon_round.check_approval, PlanRejected("x"), ErrorCode.PLAN_REJECTED, "plan_check"),
    (daemon_round.cap_args, TrainingArgsError("x"), ErrorCode.TRAINING_ARGS_INVALID, "arguments"),
    (daemon_round.load_dataset, UnknownDataset("x"), ErrorCode.UNKNOWN_DATASET, "dataset_load"),
    (daemon_round.load_dataset, DatasetError("x"), ErrorCode.DATASET_LOAD_FAILED, "dataset_load"),
    (daemon_round.load_params, TransferError("x"), ErrorCode.TRANSFER_FAILED, "params_download"),
    (daemon_round.load_params, SerializationError("x"), ErrorCode.PARAMS_INVALID, "params"),
    (round.load_plan, PlanSourceError("x"), ErrorCode.PLAN_INVALID, "plan_load"),
    (round.load_plan, ZeroDivisionError("module code"), ErrorCode.PLAN_INVALID, "plan_load"),
    (round.check_loop, RuntimeError("refused"), ErrorCode.CUSTOM_LOOP_REFUSED, "plan_check"),
    (round.build_plan, KeyError("lr"), ErrorCode.PLAN_INVALID, "model_init"),
    (round.set_params, SerializationError("x"), ErrorCode.PARAMS_INVALID, "params"),
    (round.set_params, RuntimeError("size"), ErrorCode.PARAMS_INVALID, "params"),
    (round.load_data, TrainingArgsError("x"), ErrorCode.TRAINING_ARGS_INVALID, "arguments"),
    (round.load_data, FileNotFoundError("x"), ErrorCode.DATASET_LOAD_FAILED, "dataset_load"),
    (round.train, NonFiniteError("x"), ErrorCode.NON_FINITE, "training"),
    (round.train, SerializationError("control"), ErrorCode.PARAMS_INVALID, "params"),
    (round.train, AlgorithmError("x"), ErrorCode.TRAINING_ARGS_INVALID, "arguments"),
    (round.train, ValueError("plan bug"), ErrorCode.TRAINING_FAILED, "training"),
    (round.evaluate, ValueError("x"), ErrorCode.TRAINING_FAILED, "testing"),
    (daemon_round.protect, NonFiniteError("x"), ErrorCode.NON_FINITE, "update"),
    (daemon_round.protect, UpdateRefused("x"), ErrorCode.PARAMS_INVALID, "update"),
    (daemon_round.upload, TransferError("x"), ErrorCode.TRANSFER_FAILED, "upload"),
]


@pytest.mark.parametrize("st, exc, code, where", CASES, ids=[f"{c[0].name}-{type(c[1]).__name__}" for c in CASES])
def test_each_exception_maps_to_its_code_and_stage(st, exc, code, where) -> None:
    assert classify(exc, st.label, st.fallback) == (code, where)


def test_run_stages_stops_at_the_first_failure_with_its_code() -> None:
    ran: list[str] = []

    @stage("first_label", ErrorCode.INTERNAL)
    def first(state: list[str]) -> None:
        state.append("first")

    @stage("second_label", ErrorCode.DATASET_LOAD_FAILED)
    def second(state: list[str]) -> None:
        raise OSError("disk gone")

    @stage("third_label", ErrorCode.INTERNAL)
    def third(state: list[str]) -> None:
        state.append("third")

    with pytest.raises(RoundFailure) as info:
        run_stages([first, second, third], ran, "req-1")
    assert ran == ["first"]
    assert (info.value.code, info.value.stage) == (ErrorCode.DATASET_LOAD_FAILED, "second_label")
    # not fedsilo's own text: the type and an error id leave the node, the text stays in its log
    assert info.value.message.startswith("the plan raised OSError (error E") and "disk gone" not in info.value.message


def test_a_round_failure_raised_in_a_stage_is_kept() -> None:
    @stage("plan_check", ErrorCode.INTERNAL)
    def reject(state: object) -> None:
        raise PlanRejected("no")

    @stage("somewhere", ErrorCode.INTERNAL)
    def nested(state: object) -> None:
        run_stages([reject], None)  # fedsilo's code raises the RoundFailure: kept as it is

    with pytest.raises(RoundFailure) as info:
        run_stages([nested], None)
    assert (info.value.code, info.value.stage) == (ErrorCode.PLAN_REJECTED, "plan_check")


def test_a_round_failure_raised_by_plan_code_is_not_trusted() -> None:
    @stage("somewhere", ErrorCode.INTERNAL)
    def forge(state: object) -> None:  # code outside fedsilo's source, as a plan's is
        raise RoundFailure(ErrorCode.PLAN_REJECTED, "password=hunter2", "plan_check")

    with pytest.raises(RoundFailure) as info:
        run_stages([forge], None)
    assert (info.value.code, info.value.stage) == (ErrorCode.INTERNAL, "somewhere")
    assert "hunter2" not in info.value.message
