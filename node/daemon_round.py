"""The daemon's half of a training round: everything that needs the node's stores or credentials.

Before the worker: fetch_plan -> check_approval -> cap_args -> load_dataset -> load_params, then the
worker runs the plan (`round.py`); after it: protect -> upload. The daemon never executes plan code;
the worker never sees a token, a password or the node's directory.

    r = DaemonRound(request, node)           # node: the daemon's NodeResources
    run_stages(BEFORE_WORKER, r)             # RoundFailure (code, message, stage) on the first failure
    r.worker_result = worker.run(...)
    run_stages(AFTER_WORKER, r)              # r.reply_blobs: uploaded; r.applied: what the node changed
"""

from __future__ import annotations

import os
import stat
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsilo.common.errors import ErrorCode, PlanNotApproved, PlanRejected
from fedsilo.common.training_args import TrainingArgs
from fedsilo.network.messages import BlobRef, TrainRequest

from .audit import AuditLog
from .compression import compress
from .config import NodeConfig
from .datasets import DatasetStore, check_min_count
from .dp_policy import effective_dp
from .dp_round import charge_budget, log_raised, needs_dp, spend_budget
from .job_state import job_state_dir
from .loading_plans import attach as attach_loading_plan
from .plans import PlanStore
from .secagg import mask_update, open_shares
from .stages import stage
from .transfer import fetch_blobs, fetch_plan_source, lean_request, upload_blobs

PLAN_CACHE_SIZE = 16
"""Plans kept as source text by sha256 (at most 4 MiB each, a few KiB in practice)."""


@dataclass
class NodeResources:
    """What the daemon's task runner holds for rounds: config, stores, its own file-store client."""

    config: NodeConfig
    datasets: DatasetStore
    plans: PlanStore
    audit: AuditLog
    files: Any  # FileStoreClient (its import pulls in requests: kept out of the daemon's start-up)
    plan_sources: OrderedDict[str, str] = field(default_factory=OrderedDict)
    secagg: Any = None
    """The daemon's `SecaggSessions` (secagg.py): a round's secure-aggregation state spans several messages."""

    def cached_source(self, sha256: str) -> str | None:
        source = self.plan_sources.get(sha256)
        if source is not None:
            self.plan_sources.move_to_end(sha256)
        return source

    def keep_source(self, sha256: str, source: str) -> None:
        self.plan_sources[sha256] = source
        while len(self.plan_sources) > PLAN_CACHE_SIZE:
            self.plan_sources.popitem(last=False)


@dataclass
class DaemonRound:
    """One round's state on the daemon's side."""

    request: TrainRequest
    node: NodeResources
    scratch: Path
    """A folder of this round's own, outside the node directory (the worker's state_dir lives in it)."""
    started: float = field(default_factory=time.perf_counter)
    source: str = ""
    args: TrainingArgs | None = None
    applied: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    received: dict[str, Any] = field(default_factory=dict)
    download_s: float = 0.0
    upload_s: float = 0.0
    worker_blobs: dict[str, bytes] = field(default_factory=dict)
    reply_blobs: dict[str, BlobRef] = field(default_factory=dict)
    stage_s: dict[str, float] = field(default_factory=dict)
    """Wall seconds of each daemon stage, and of the exchange with the worker (`worker`)."""
    sample_size: int = 0
    """The trainer's count clamped to the dataset's rows, set after the worker: secure aggregation's weight."""

    @property
    def state_dir(self) -> Path:
        return self.scratch / "state"


def apply_caps(ta: TrainingArgs, cfg: NodeConfig, dp_needed: bool | None = False) -> tuple[TrainingArgs, dict]:
    """The node's limits applied to the researcher's arguments: (capped args, what changed). `dp_needed`: the
    dataset has a privacy budget; None = an evaluation, which trains nothing (no DP policy)."""
    lim = cfg.limits
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
    # DataManager may set its own); max_num_updates without num_updates by the trainer, which counts steps.
    if ta.use_gpu and not lim.allow_gpu:
        cap("use_gpu", True, False)
    new = effective_dp(ta.dp_args, cfg.dp, dp_needed) if dp_needed is not None else ta.dp_args
    if new != ta.dp_args:
        cap("dp_args", ta.dp_args, new)
    if changes:
        ta = TrainingArgs.parse({**ta.model_dump(), **changes})
    return ta, applied


# ------------------------------------------------------------------------------------- before the worker
@stage("plan_download", ErrorCode.TRANSFER_FAILED)
def fetch_plan(r: DaemonRound) -> None:
    """The plan's source, downloaded and verified once per sha256 (content-addressed)."""
    sha = r.request.plan.sha256
    source = r.node.cached_source(sha)
    if source is None:
        t0 = time.perf_counter()
        source = fetch_plan_source(r.node.files, r.request.plan)
        r.download_s += time.perf_counter() - t0
        r.node.keep_source(sha, source)
    r.source = source


@stage("plan_check", ErrorCode.INTERNAL)
def check_approval(r: DaemonRound) -> None:
    """Checked again when the round starts: approval may have been revoked since the request was queued.
    An unknown plan is recorded as pending for the data manager."""
    req, plans, cfg = r.request, r.node.plans, r.node.config
    sha = req.plan.sha256
    status = plans.status(sha)
    if status == "unknown":
        plans.submit(r.source, req.plan_name, req.sender, description=f"first seen in job {req.job_id}")
        status = "pending"
    if not cfg.node.require_approval or status == "approved":
        return
    if status == "rejected":
        raise PlanRejected(f"plan {sha} was rejected on this node: {plans.get(sha).get('note') or 'no note'}")
    raise PlanNotApproved(f"plan {sha} ('{req.plan_name}') is not approved on node '{cfg.node.name}'; "
                          "it is recorded as pending for the data manager")  # fmt: skip


@stage("arguments", ErrorCode.TRAINING_ARGS_INVALID)
def cap_args(r: DaemonRound) -> None:
    train = isinstance(r.request, TrainRequest)
    r.args, r.applied = apply_caps(r.request.training_args, r.node.config, needs_dp(r) if train else None)
    log_raised(r)


@stage("dataset_load", ErrorCode.DATASET_LOAD_FAILED)
def load_dataset(r: DaemonRound) -> None:
    """The dataset's record, re-checked: it may have been removed or moved since the request was queued."""
    record = r.node.datasets.get(r.request.dataset_id)
    r.node.datasets.check_path(record["path"])
    check_min_count(record, r.node.config.node.min_count)
    r.record = attach_loading_plan(record, r.node.config.paths.root)  # the worker applies it (loading_plan.bind)


@stage("params_download", ErrorCode.TRANSFER_FAILED)
def load_params(r: DaemonRound) -> None:
    """Every blob of the request, downloaded and parsed here (safetensors only, never unpickled): a hostile
    payload is refused before the worker sees it, and the daemon keeps the received global parameters
    (numpy arrays: the daemon imports no torch) for the update's checks."""
    from fedsilo.common.arrays import arrays_from_bytes

    t0 = time.perf_counter()
    r.blobs = fetch_blobs(r.node.files, r.request.blobs)
    r.download_s += time.perf_counter() - t0
    r.request = lean_request(r.request)  # inline data used: the worker's header and the round keep refs only
    parsed = {name: arrays_from_bytes(data, copy=False) for name, data in r.blobs.items()}  # views: buffers it owns
    r.received = parsed["params"]


@stage("training", ErrorCode.TRAINING_FAILED)
def stage_state(r: DaemonRound) -> None:
    """The algorithm's state of this job (SCAFFOLD's c_i) copied to the scratch folder the worker is given:
    its real folder's parents lead to the node directory and its credentials."""
    _copy_files(job_state_dir(r.node.config.paths.state, r.request.sender, r.request.job_id), r.state_dir)


BEFORE_WORKER = [fetch_plan, check_approval, open_shares, cap_args,
                 load_dataset, load_params, stage_state, charge_budget]


# -------------------------------------------------------------------------------------- after the worker
@stage("update", ErrorCode.PARAMS_INVALID)
def protect(r: DaemonRound) -> None:
    """The output protections (protection.py) on what the worker returned."""
    from .protection import protect_update

    protected = protect_update(r.worker_blobs, r.received, r.node.config.dp)
    r.worker_blobs = protected.blobs
    r.applied.update(protected.applied)


@stage("upload", ErrorCode.TRANSFER_FAILED)
def upload(r: DaemonRound) -> None:
    t0 = time.perf_counter()
    r.reply_blobs = upload_blobs(r.node.files, r.worker_blobs, r.request.sender)
    r.upload_s = time.perf_counter() - t0


@stage("upload", ErrorCode.INTERNAL)
def keep_state(r: DaemonRound) -> None:
    """The update is delivered: the state the worker wrote becomes the job's (a failed round keeps the old)."""
    _copy_files(r.state_dir, job_state_dir(r.node.config.paths.state, r.request.sender, r.request.job_id))


AFTER_WORKER = [spend_budget, protect, compress, mask_update, upload, keep_state]

STATE_FILE_BYTES = 1 << 30
"""A state file larger than this is not copied (the worker wrote it: plan code can write anything)."""


def _copy_files(src: Path, dst: Path) -> None:
    """Regular files of `src` (not links: the worker chooses what lies in its folder) into `dst`, each
    replaced atomically."""
    if not src.is_dir():
        return
    dst.mkdir(parents=True, exist_ok=True)
    for entry in os.scandir(src):
        info = entry.stat(follow_symlinks=False)
        if not stat.S_ISREG(info.st_mode) or info.st_size > STATE_FILE_BYTES or entry.name.startswith("."):
            continue
        fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            data = f.read(STATE_FILE_BYTES + 1)
        tmp = dst / f".{entry.name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, dst / entry.name)
