"""The worker's half of a training round: plan code runs here, with bytes the daemon handed over.

The daemon (`daemon_round.py`) fetched and verified the plan and the blobs, checked the approval, capped
the arguments and found the dataset; this half builds the plan, trains with the node's `Trainer`,
evaluates and packages the update as safetensors bytes. It holds no credentials and opens no
connection: the daemon checks (`protection.py`) and uploads what it returns.

    load_plan -> check_loop -> load_params -> build_plan -> set_params -> load_data -> test_global -> train
        -> evaluate -> package
    an EvaluateRequest: load_plan -> ... -> load_data -> evaluate_only (no training, no blob returned)

Each stage is a small function; `stages.ERRORS` turns what one raises into (ErrorCode, stage).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsilo.common.datasets.loading_plan import bind
from fedsilo.common.errors import ErrorCode
from fedsilo.common.plan_source import load_plan_class
from fedsilo.common.serialization import check_compatible, params_from_bytes, params_to_buffers
from fedsilo.common.training_args import TrainingArgs
from fedsilo.common.training_plan import TorchTrainingPlan, seed_everything
from fedsilo.network.messages import EvaluateRequest, LogMessage, Message, ScalarMessage, TrainRequest

from .algorithms import make_hooks
from .config import NodeConfig
from .device import DeviceChoice, choose_device
from .model_init import build_replacing
from .personal import LocalLayers
from .stages import RoundFailure, run_stages, stage
from .trainer import Trainer, TrainResult, check_plan_loop

log = logging.getLogger("fedsilo.node.round")


@dataclass
class RoundContext:
    """What the worker keeps between rounds: the node's settings (no directory, no credentials) and the
    plan classes it loaded, by (sha256, name)."""

    config: NodeConfig
    plan_cache: dict[tuple[str, str], type] = field(default_factory=dict)

    @property
    def node_id(self) -> str:
        return self.config.node.node_id


@dataclass
class WorkerTask:
    """One round as the daemon hands it over: the request, verified plan source and blob bytes, the capped
    arguments, the dataset's record and a scratch folder for the algorithm's state."""

    request: TrainRequest | EvaluateRequest
    source: str
    args: TrainingArgs
    record: dict[str, Any]
    blobs: dict[str, bytes]
    state_dir: Path


@dataclass
class WorkerResult:
    """What the worker returns: the update's blobs as safetensors payloads (`SerializedParams`: the tensors'
    memory), the trainer's own sample count."""

    blobs: dict[str, Any]
    sample_size: int
    metrics: dict[str, float]
    applied_caps: dict[str, Any]
    train_s: float
    test_samples: int = 0
    """The test split the `test_*`/`global_*` metrics (an evaluation's metrics) were computed on."""
    device: dict[str, Any] = field(default_factory=dict)
    """Where the round ran (`DeviceChoice.report()`: used, gpu_requested, fallback)."""
    stage_s: dict[str, float] = field(default_factory=dict)
    """Wall seconds of each worker stage (`run_stages`), for the reply's timings."""


@dataclass
class _Round:
    task: WorkerTask
    ctx: RoundContext
    emit: Callable[[Message], None]
    plan_cls: type | None = None
    custom_loop: list[str] = field(default_factory=list)
    global_metrics: dict[str, float] = field(default_factory=dict)
    test_samples: int = 0
    data_manager: Any = None
    received: dict[str, Any] = field(default_factory=dict)
    extra_blobs: dict[str, Any] = field(default_factory=dict)
    plan: Any = None
    train_loader: Any = None
    test_loader: Any = None
    applied: dict[str, Any] = field(default_factory=dict)
    trainer: Trainer | None = None
    local_layers: LocalLayers | None = None
    device: DeviceChoice | None = None
    result: TrainResult | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    out: WorkerResult | None = None


def execute_round(task: WorkerTask, ctx: RoundContext, emit: Callable[[Message], None]) -> WorkerResult:
    """Run the worker's stages; `RoundFailure` (code, message, stage) when one fails."""
    state = _Round(task, ctx, emit)
    stages = EVALUATION_STAGES if isinstance(task.request, EvaluateRequest) else WORKER_STAGES
    timings: dict[str, float] = {}
    run_stages(stages, state, task.request.request_id, timings)
    assert state.out is not None
    state.out.stage_s = timings
    return state.out


@stage("plan_load", ErrorCode.PLAN_INVALID)
def load_plan(r: _Round) -> None:
    """The plan class, loaded once per sha256 (the plan's module-level code runs here, once)."""
    req = r.task.request
    key = (req.plan.sha256, req.plan_name)
    if key not in r.ctx.plan_cache:
        r.ctx.plan_cache[key] = load_plan_class(r.task.source, req.plan_name)
    r.plan_cls = r.ctx.plan_cache[key]


@stage("plan_check", ErrorCode.CUSTOM_LOOP_REFUSED)
def check_loop(r: _Round) -> None:
    """A plan defining its own loop escapes the node's caps and DP: refused unless allowed (trainer.py)."""
    cfg = r.ctx.config
    r.custom_loop = check_plan_loop(r.plan_cls, r.task.request.plan.sha256, cfg.node, cfg.dp)  # type: ignore[arg-type]


@stage("params", ErrorCode.PARAMS_INVALID)
def load_params(r: _Round) -> None:
    """The received global parameters and the algorithm's blobs, parsed from the bytes handed over."""
    # views into the frame the round's process received (its own copy-on-write pages): no copy of the model
    r.received = params_from_bytes(r.task.blobs["params"], copy=False)
    r.extra_blobs = {k: params_from_bytes(v, copy=False) for k, v in r.task.blobs.items() if k != "params"}


@stage("model_init", ErrorCode.PLAN_INVALID)
def build_plan(r: _Round) -> None:
    """The plan instantiated with the round's arguments; its optimizer is built now so a bad
    `init_optimizer` fails here, not in training."""
    task, args = r.task, r.task.args
    if args.random_seed is not None:
        seed_everything(args.random_seed)
    # The node chooses the device: the researcher's request (before the daemon's caps) against `allow_gpu`.
    r.device = choose_device(task.request.training_args.use_gpu, r.ctx.config.limits.allow_gpu)
    if r.device.fallback:
        _warn(f"round {task.request.round}: use_gpu: {r.device.fallback}", task.request, r.ctx, r.emit)
    training_args = args.model_copy(update={"use_gpu": r.device.device.type == "cuda"})

    def build() -> TorchTrainingPlan:
        plan = r.plan_cls()  # type: ignore[misc]
        plan.model_args = dict(task.request.model_args)
        plan.dataset_path = task.record["path"]
        plan.dataset = {k: v for k, v in task.record.items() if k != "path"}
        plan.round = task.request.round
        plan.node_id = r.ctx.node_id
        plan.post_init(task.request.model_args, training_args)
        plan.optimizer()
        return plan

    # the received model replaces what the initialisers draw: they are skipped where it replaces all (model_init)
    r.plan, _ = build_replacing(build, TorchTrainingPlan.model, r.received.keys())


@stage("params", ErrorCode.PARAMS_INVALID)
def set_params(r: _Round) -> None:
    """The received global model into the plan; its personalised layers, if any, from this node's own state."""
    check_compatible(r.received, r.plan.shared_parameters(copy=False))  # names, shapes, dtypes: no copy needed
    r.plan.set_parameters(r.received)
    r.local_layers = LocalLayers(r.plan, r.task.state_dir)
    r.local_layers.restore()


@stage("dataset_load", ErrorCode.DATASET_LOAD_FAILED)
def load_data(r: _Round) -> None:
    """The plan's DataManager under the node's batch-size cap, split into training and held-out loaders."""
    cfg, args = r.ctx.config, r.task.args
    dm = r.plan.data_manager()
    bind(dm.dataset, r.task.record)  # registered options and the node's data loading plan (a T1 served as T1w)
    r.applied.update(dm.apply_training_args(args, max_batch_size=cfg.limits.max_batch_size))
    r.train_loader, r.test_loader = dm.split(args.test_ratio, seed=args.random_seed or 0)
    r.data_manager = dm


@stage("testing", ErrorCode.TRAINING_FAILED)
def test_global(r: _Round) -> None:
    """`test_on_global_updates`: the received global model on the test split, before any training step."""
    if r.task.args.tests_global and r.test_loader is not None:
        r.global_metrics = _test(r, _tester(r), r.test_loader)
        r.test_samples = len(r.test_loader.dataset)


@stage("training", ErrorCode.TRAINING_FAILED)
def train(r: _Round) -> None:
    cfg, req = r.ctx.config, r.task.request
    assert isinstance(req, TrainRequest)
    algorithm = req.algorithm.parse()
    r.trainer = Trainer(r.plan, r.task.args, cfg.limits, cfg.dp, algorithm, make_hooks(algorithm, r.task.state_dir),
                        _scalars(r), r.custom_loop)  # fmt: skip
    r.result = r.trainer.train(r.train_loader, r.received, r.extra_blobs)
    r.metrics = dict(r.result.metrics)
    r.applied.update(r.result.applied_caps)


@stage("testing", ErrorCode.TRAINING_FAILED)
def evaluate(r: _Round) -> None:
    """`test_on_local_updates` (on by default): the local update on the test split (`test_*`); the received
    model's metrics (`test_global`) join the reply as `global_*`."""
    r.metrics.update({f"global_{k}": v for k, v in r.global_metrics.items()})
    if r.task.args.tests_local and r.test_loader is not None:
        assert r.trainer is not None
        r.metrics.update({f"test_{k}": v for k, v in _test(r, r.trainer, r.test_loader).items()})
        r.test_samples = len(r.test_loader.dataset)


@stage("testing", ErrorCode.TRAINING_FAILED)
def evaluate_only(r: _Round) -> None:
    """An EvaluateRequest: the received model on the test split, or on the whole dataset when `test_ratio`
    leaves none (a dataset kept for validation), unshuffled and without dropping a batch. No training step
    runs and no blob is returned: the daemon has nothing to upload."""
    loader = r.test_loader
    if loader is None:
        loader = r.data_manager.loader(shuffle=False, drop_last=False)
    r.test_samples = len(loader.dataset)
    metrics = _finite_metrics(_test(r, _tester(r), loader), r.task.request, r.ctx, r.emit)
    r.out = WorkerResult({}, r.test_samples, metrics, r.applied, 0.0, r.test_samples, _device(r))


@stage("package", ErrorCode.INTERNAL)
def package(r: _Round) -> None:
    """The update as safetensors bytes. The algorithm's state goes to the scratch folder now; the daemon
    keeps it only once the update is uploaded (a failed round leaves the node's state as it was)."""
    assert r.result is not None and r.trainer is not None
    assert r.local_layers is not None
    shared = r.local_layers.split(r.result.params)  # personalised layers never leave the node
    # sent to the daemon from the tensors' memory (workerwire.send_frame): no serialised copy of the model
    blobs = {key: params_to_buffers(value) for key, value in {**r.result.extra_blobs, "params": shared}.items()}
    r.trainer.commit()
    r.local_layers.commit()
    train_s = float(r.metrics.pop("train_s", 0.0))
    metrics = _finite_metrics(r.metrics, r.task.request, r.ctx, r.emit)
    r.out = WorkerResult(blobs, r.result.sample_count, metrics, r.applied, train_s, r.test_samples, _device(r))


WORKER_STAGES = [load_plan, check_loop, load_params, build_plan, set_params, load_data, test_global, train, evaluate,
                 package]  # fmt: skip
EVALUATION_STAGES = [load_plan, check_loop, load_params, build_plan, set_params, load_data, evaluate_only]


def _device(r: _Round) -> dict[str, Any]:
    return r.device.report() if r.device is not None else {}


def _tester(r: _Round) -> Trainer:
    """A trainer used only for `test` (the plan's `testing_step`, or its allowed `testing_routine`)."""
    cfg = r.ctx.config
    return Trainer(r.plan, r.task.args, cfg.limits, cfg.dp, custom_loop=r.custom_loop)


def _test(r: _Round, trainer: Trainer, loader: Any) -> dict[str, float]:
    """`trainer.test`, and a WARNING to the researcher for each reason a test metric was left out."""
    metrics = trainer.test(loader)
    for text in trainer.test_warnings:
        _warn(f"round {r.task.request.round}: {text}", r.task.request, r.ctx, r.emit)
    return metrics


def _warn(text: str, request: TrainRequest | EvaluateRequest, ctx: RoundContext,
          emit: Callable[[Message], None]) -> None:  # fmt: skip
    log.warning("[%s] %s", request.request_id, text)
    emit(LogMessage(sender=ctx.node_id, node_id=ctx.node_id, level="WARNING", text=text, job_id=request.job_id))


def _scalars(r: _Round) -> Callable[[str, float, int, int, int, int], None]:
    # what it needs, not `r`: a closure over the round's state made a cycle (state -> trainer -> this -> state)
    # that kept each round's model, gradients and blobs (150 MB a round, peerbench large) in a job's process
    # until the cyclic collector ran
    req, emit, node_id = r.task.request, r.emit, r.ctx.node_id

    def on_scalar(key: str, value: float, step: int, epoch: int, num_samples: int, total_samples: int) -> None:
        emit(ScalarMessage(sender=node_id, node_id=node_id, job_id=req.job_id, round=req.round,
                           dataset_id=req.dataset_id, key=key, value=value, step=step, epoch=epoch,
                           num_samples=num_samples, total_samples=total_samples))  # fmt: skip

    return on_scalar


def _finite_metrics(metrics: dict[str, Any], request: TrainRequest | EvaluateRequest, ctx: RoundContext,
                    emit: Callable[[Message], None]) -> dict[str, float]:  # fmt: skip
    """The metrics a reply can carry: JSON has no NaN or infinity, and a reply holding one is refused whole.

    The loss and the parameters were checked in training; a test metric (or DP's epsilon) that is not
    finite is left out and the researcher told why, so that the update itself still counts."""
    kept: dict[str, float] = {}
    for key, value in metrics.items():
        number = float(value)
        if math.isfinite(number):
            kept[key] = number
            continue
        _warn(f"round {request.round}: metric '{key}' is {number}; left out of the reply", request, ctx, emit)
    return kept


__all__ = ["RoundContext", "RoundFailure", "WorkerResult", "WorkerTask", "execute_round"]
