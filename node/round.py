"""One training round on the node, run inside the worker process.

download plan -> sha256 check -> approval -> caps -> dataset -> params -> train -> upload -> reply.
Every failure becomes an ErrorReply with a code and a stage; the traceback goes to the node log
under the request id.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fedsilo.common.errors import ErrorCode, NonFiniteError, PlanSourceError, SerializationError, TransferError
from fedsilo.common.hashing import sha256_bytes
from fedsilo.common.training_args import TrainingArgs, TrainingArgsError
from fedsilo.network.messages import ErrorReply, LogMessage, Message, ScalarMessage, TrainReply, TrainRequest

from .algorithms import job_state_dir, make_hooks
from .audit import AuditLog
from .config import NodeConfig
from .datasets import DatasetError, DatasetStore, UnknownDataset
from .plans import PlanStore
from .trainer import CustomLoopRefused, Trainer, check_plan_loop

log = logging.getLogger("fedsilo.node.round")


class RoundFailure(Exception):
    """A round stops here; becomes an ErrorReply."""

    def __init__(self, code: ErrorCode, message: str, stage: str) -> None:
        super().__init__(message)
        self.code, self.message, self.stage = code, message, stage


@dataclass
class RoundContext:
    """What the worker keeps between rounds: config, stores, a keep-alive file-store client, loaded plans."""

    config: NodeConfig
    datasets: DatasetStore
    plans: PlanStore
    audit: AuditLog
    filestore: Any  # FileStoreClient
    plan_cache: dict[tuple[str, str], tuple[str, type]] = field(default_factory=dict)

    @property
    def node_id(self) -> str:
        return self.config.node.node_id


def apply_caps(raw: dict[str, Any], cfg: NodeConfig) -> tuple[TrainingArgs, dict[str, Any]]:
    """The node's limits applied to the researcher's arguments: (capped args, what changed)."""
    ta = TrainingArgs.parse(raw)
    lim, dp = cfg.limits, cfg.dp
    changes: dict[str, Any] = {}
    applied: dict[str, Any] = {}

    def cap(key: str, requested: Any, value: Any) -> None:
        changes[key] = value
        applied[key] = {"requested": requested, "applied": value}

    if lim.max_epochs is not None and ta.epochs > lim.max_epochs:
        cap("epochs", ta.epochs, lim.max_epochs)
    if lim.max_num_updates is not None and ta.num_updates is not None and ta.num_updates > lim.max_num_updates:
        cap("num_updates", ta.num_updates, lim.max_num_updates)
    # max_batch_size is applied where the batch size is final: DataManager.apply_training_args (the plan's
    # DataManager may set its own).
    if ta.use_gpu and not lim.allow_gpu:
        cap("use_gpu", True, False)
    if dp.required:
        assert dp.sigma is not None and dp.clip is not None  # guaranteed by DPPolicy validation
        want = dict(ta.dp_args or {})
        new = {
            "type": "local",
            "delta": want.get("delta", 1e-5),
            "sigma": max(want.get("sigma", 0.0), dp.sigma),
            "clip": min(want.get("clip", dp.clip), dp.clip),
        }
        if new != ta.dp_args:
            cap("dp_args", ta.dp_args, new)
    if changes:
        ta = TrainingArgs.parse({**ta.model_dump(), **changes})
    return ta, applied


def execute_round(request: TrainRequest, ctx: RoundContext, emit: Callable[[Message], None]) -> Message:
    """Run a round and return the reply (TrainReply or ErrorReply); never raises."""
    t_start = time.perf_counter()
    cfg = ctx.config
    base = {"sender": ctx.node_id, "node_id": ctx.node_id, "node_name": cfg.node.name,
            "in_reply_to": request.request_id}  # fmt: skip
    audit = {"plan_sha256": request.plan.sha256, "dataset_id": request.dataset_id, "job_id": request.job_id,
             "round": request.round, "request_id": request.request_id}  # fmt: skip
    try:
        reply = _run(request, ctx, emit, base, t_start)
        ctx.audit.record("round_executed", f"researcher:{request.sender}", outcome="ok",
                         sample_size=reply.sample_size, **audit)  # fmt: skip
        return reply
    except RoundFailure as exc:
        if exc.code in (ErrorCode.PLAN_NOT_APPROVED, ErrorCode.PLAN_REJECTED, ErrorCode.UNKNOWN_DATASET):
            log.warning("[%s] round refused: %s", request.request_id, exc.message)
        else:
            log.error("[%s] round failed at %s: %s", request.request_id, exc.stage, exc.message, exc_info=True)
        code, message, stage = exc.code, exc.message, exc.stage
    except Exception as exc:  # the catch-all that keeps the worker alive on any bug
        log.exception("[%s] unexpected error in round", request.request_id)
        code, message, stage = ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}", "round"
    try:
        ctx.audit.record("round_executed", f"researcher:{request.sender}", outcome=str(code), stage=stage, **audit)
    except Exception:
        log.exception("[%s] could not write the audit entry", request.request_id)
    return ErrorReply(**base, code=code, message=message[:3900], stage=stage, job_id=request.job_id,
                      round=request.round)  # fmt: skip


def _finite_metrics(
    metrics: dict[str, Any], request: TrainRequest, ctx: RoundContext, emit: Callable[[Message], None]
) -> dict[str, float]:
    """The metrics a reply can carry: JSON has no NaN or infinity, and a reply holding one is refused whole.

    The loss and the parameters were checked in training; a test metric (or DP's epsilon) that is not
    finite is left out and the researcher told why, so that the update itself still counts."""
    kept: dict[str, float] = {}
    for key, value in metrics.items():
        number = float(value)
        if math.isfinite(number):
            kept[key] = number
            continue
        text = f"round {request.round}: metric '{key}' is {number}; left out of the reply"
        log.warning("[%s] %s", request.request_id, text)
        emit(LogMessage(sender=ctx.node_id, node_id=ctx.node_id, level="WARNING", text=text, job_id=request.job_id))
    return kept


def _fail(code: ErrorCode, stage: str, exc: BaseException | str) -> RoundFailure:
    text = exc if isinstance(exc, str) else f"{exc}" or type(exc).__name__
    return RoundFailure(code, text, stage)


def _run(
    request: TrainRequest,
    ctx: RoundContext,
    emit: Callable[[Message], None],
    base: dict[str, Any],
    t_start: float,
) -> TrainReply:
    from fedsilo.common.plan_source import load_plan_class
    from fedsilo.common.serialization import check_compatible, params_from_bytes, params_to_bytes
    from fedsilo.common.training_plan import TrainingPlanError, seed_everything

    cfg = ctx.config
    sha = request.plan.sha256
    download_s = 0.0

    # ---- plan: fetched once per sha256 (content-addressed), approval checked every round
    cache_key = (sha, request.plan_name)
    cached = ctx.plan_cache.get(cache_key)
    if cached is None:
        t0 = time.perf_counter()
        try:
            raw = ctx.filestore.download_bytes(request.plan, max_bytes=4 * 1024 * 1024)
        except TransferError as exc:
            raise _fail(ErrorCode.TRANSFER_FAILED, "plan_download", exc) from exc
        download_s += time.perf_counter() - t0
        if sha256_bytes(raw) != sha:
            raise _fail(ErrorCode.PLAN_HASH_MISMATCH, "plan_check", f"plan content does not hash to {sha}")
        try:
            source = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _fail(ErrorCode.PLAN_INVALID, "plan_check", "plan source is not UTF-8 text") from exc
    else:
        source = cached[0]

    status = ctx.plans.status(sha)
    if status == "unknown":
        ctx.plans.submit(source, request.plan_name, request.sender, description=f"first seen in job {request.job_id}")
        status = "pending"
    if cfg.node.require_approval and status != "approved":
        if status == "rejected":
            note = ctx.plans.get(sha).get("note") or "no note"
            raise _fail(ErrorCode.PLAN_REJECTED, "plan_check", f"plan {sha} was rejected on this node: {note}")
        raise _fail(
            ErrorCode.PLAN_NOT_APPROVED,
            "plan_check",
            f"plan {sha} ('{request.plan_name}') is not approved on node '{cfg.node.name}'; "
            "it is recorded as pending for the data manager",
        )

    # ---- arguments, with the node's caps
    try:
        ta, applied = apply_caps(request.training_args, cfg)
    except TrainingArgsError as exc:
        raise _fail(ErrorCode.TRAINING_ARGS_INVALID, "arguments", exc) from exc

    # ---- dataset record (re-checked: it may have been removed or moved since the request was queued)
    try:
        record = ctx.datasets.get(request.dataset_id)
        ctx.datasets.check_path(record["path"])
    except UnknownDataset as exc:
        raise _fail(ErrorCode.UNKNOWN_DATASET, "dataset_load", exc) from exc
    except DatasetError as exc:
        raise _fail(ErrorCode.DATASET_LOAD_FAILED, "dataset_load", exc) from exc

    # ---- plan class
    if cached is None:
        try:
            plan_cls = load_plan_class(source, request.plan_name)
        except PlanSourceError as exc:
            raise _fail(ErrorCode.PLAN_INVALID, "plan_load", exc) from exc
        except Exception as exc:  # the plan's module-level code raised
            raise _fail(ErrorCode.PLAN_INVALID, "plan_load", f"{type(exc).__name__}: {exc}") from exc
        ctx.plan_cache[cache_key] = (source, plan_cls)
    else:
        plan_cls = cached[1]
    try:  # a plan defining its own loop escapes the node's caps and DP: refused unless allowed (trainer.py)
        custom_loop = check_plan_loop(plan_cls, sha, cfg.node, cfg.dp)
    except CustomLoopRefused as exc:
        raise _fail(ErrorCode.CUSTOM_LOOP_REFUSED, "plan_check", exc) from exc

    # ---- parameters (safetensors only)
    t0 = time.perf_counter()
    try:
        payload = ctx.filestore.download_bytes(request.params)
    except TransferError as exc:
        raise _fail(ErrorCode.TRANSFER_FAILED, "params_download", exc) from exc
    download_s += time.perf_counter() - t0
    try:
        received = params_from_bytes(payload)
        extra_blobs = {key: params_from_bytes(ctx.filestore.download_bytes(ref))
                       for key, ref in request.blobs.items() if key != "params"}  # fmt: skip
    except SerializationError as exc:
        raise _fail(ErrorCode.PARAMS_INVALID, "params", exc) from exc
    except TransferError as exc:
        raise _fail(ErrorCode.TRANSFER_FAILED, "params_download", exc) from exc

    # ---- instantiate and load
    if ta.random_seed is not None:
        seed_everything(ta.random_seed)
    try:
        plan = plan_cls()
        plan.model_args = dict(request.model_args)
        plan.dataset_path = record["path"]
        plan.dataset = {k: v for k, v in record.items() if k != "path"}
        plan.round = request.round
        plan.node_id = ctx.node_id
        plan.post_init(request.model_args, ta)
        plan.optimizer()  # built lazily (the researcher never needs one); a bad init_optimizer fails here
    except Exception as exc:
        raise _fail(ErrorCode.PLAN_INVALID, "model_init", f"{type(exc).__name__}: {exc}") from exc
    try:
        check_compatible(received, plan.get_parameters())
        plan.set_parameters(received)
    except (SerializationError, RuntimeError) as exc:
        raise _fail(ErrorCode.PARAMS_INVALID, "params", exc) from exc

    try:
        dm = plan.data_manager()
        applied.update(dm.apply_training_args(ta, max_batch_size=cfg.limits.max_batch_size))
        train_loader, test_loader = dm.split(ta.test_ratio, seed=ta.random_seed or 0)
    except TrainingArgsError as exc:
        raise _fail(ErrorCode.TRAINING_ARGS_INVALID, "arguments", exc) from exc
    except Exception as exc:
        raise _fail(ErrorCode.DATASET_LOAD_FAILED, "dataset_load", f"{type(exc).__name__}: {exc}") from exc

    if cfg.limits.max_num_updates is not None and ta.num_updates is None:
        planned = ta.epochs * len(train_loader)
        if planned > cfg.limits.max_num_updates:
            applied["num_updates"] = {"requested": None, "applied": cfg.limits.max_num_updates}
            plan.training_args = ta = ta.model_copy(update={"num_updates": cfg.limits.max_num_updates})

    # ---- train
    def on_scalar(key: str, value: float, step: int, epoch: int, num_samples: int, total_samples: int) -> None:
        emit(
            ScalarMessage(
                sender=ctx.node_id,
                node_id=ctx.node_id,
                job_id=request.job_id,
                round=request.round,
                dataset_id=request.dataset_id,
                key=key,
                value=value,
                step=step,
                epoch=epoch,
                num_samples=num_samples,
                total_samples=total_samples,
            )
        )

    try:
        algorithm = request.algorithm.parse()
        state_dir = job_state_dir(cfg.paths.state, request.sender, request.job_id)
        trainer = Trainer(plan, ta, cfg.limits, cfg.dp, algorithm, make_hooks(algorithm, state_dir), on_scalar,
                          custom_loop)  # fmt: skip
        result = trainer.train(train_loader, received, extra_blobs)
    except SerializationError as exc:  # an algorithm's blob does not fit the model
        raise _fail(ErrorCode.PARAMS_INVALID, "params", exc) from exc
    except NonFiniteError as exc:
        raise _fail(ErrorCode.NON_FINITE, "training", exc) from exc
    except TrainingPlanError as exc:
        raise _fail(ErrorCode.TRAINING_FAILED, "training", exc) from exc
    except Exception as exc:
        raise _fail(ErrorCode.TRAINING_FAILED, "training", f"{type(exc).__name__}: {exc}") from exc
    metrics, sample_size = result.metrics, result.sample_count
    applied.update(result.applied_caps)
    train_s = float(metrics.pop("train_s", 0.0))
    if test_loader is not None:
        try:
            for k, v in trainer.test(test_loader).items():
                metrics[f"test_{k}"] = v
        except Exception as exc:
            raise _fail(ErrorCode.TRAINING_FAILED, "testing", f"{type(exc).__name__}: {exc}") from exc

    # ---- upload
    t0 = time.perf_counter()
    try:
        blobs = {key: ctx.filestore.upload_bytes(params_to_bytes(value), readers=[request.sender])
                 for key, value in {**result.extra_blobs, "params": result.params}.items()}  # fmt: skip
    except TransferError as exc:
        raise _fail(ErrorCode.TRANSFER_FAILED, "upload", exc) from exc
    trainer.commit()
    upload_s = time.perf_counter() - t0
    timings = {
        "download_s": download_s,
        "train_s": train_s,
        "upload_s": upload_s,
        "total_s": time.perf_counter() - t_start,
    }
    return TrainReply(
        **base, job_id=request.job_id, round=request.round, dataset_id=request.dataset_id, blobs=blobs,
        sample_size=sample_size, timings=timings, metrics=_finite_metrics(metrics, request, ctx, emit),
        applied_caps=applied,
    )  # fmt: skip
