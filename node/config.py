"""A node's configuration (`NODEDIR/config.toml`) and the layout of its directory."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from fedsilo.common.config import Timeouts, read_toml, validate, write_toml


@dataclass(frozen=True)
class NodePaths:
    root: Path
    config: Path
    network: Path
    db: Path
    datasets: Path
    plans: Path
    audit: Path
    users: Path
    queue: Path
    logs: Path
    log_file: Path
    status: Path
    lock: Path
    state: Path
    """Per-experiment algorithm state kept between rounds (SCAFFOLD's c_i): state/<researcher>/<job_id>/."""


def node_paths(nodedir: str | Path) -> NodePaths:
    """The layout of the node directory `nodedir` (made absolute against the current directory)."""
    return _layout(Path(nodedir).expanduser().absolute())


@lru_cache(maxsize=64)
def _layout(root: Path) -> NodePaths:
    # The daemon asks for its layout about 11 times a round (stores built per request, the audit log, state
    # folders): building 14 paths each time was 3 ms of a round's 25 ms of daemon CPU under cProfile (K=3
    # small, 2026-12-01). NodePaths is frozen, so one instance per directory can be shared.
    db = root / "db"
    return NodePaths(
        root=root,
        config=root / "config.toml",
        network=root / "network.json",
        db=db,
        datasets=db / "datasets.json",
        plans=db / "plans.json",
        audit=db / "audit.json",
        users=db / "users.json",
        queue=root / "queue",
        logs=root / "logs",
        log_file=root / "logs" / "node.log",
        status=root / "status.json",
        lock=root / "node.lock",
        state=root / "state",
    )


class NodeSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64)
    node_id: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    require_approval: bool = True
    force_secure_aggregation: bool = False
    """Train only under secure aggregation (Fed-BioMed's name): a plain training request is refused (FS801),
    so the researcher never sees this node's update on its own."""
    data_roots: list[str] = Field(default_factory=list)
    """Datasets must live under one of these folders; empty = anywhere the node can read."""
    min_count: int = Field(5, ge=1)
    """Counts below this (samples, subjects, a category's rows, missing cells) are shown to researchers and in
    the GUI as "< min_count", and a dataset with fewer samples is refused for training and evaluation (FS202):
    its reply's sample count would tell the same number."""
    sandbox: Literal["bwrap", "off"] = "bwrap"
    """How plan code is confined (`node/sandbox.py`): "bwrap" = bubblewrap, no network, a read-only view of
    Python and the round's dataset, `[limits] sandbox_*` per round; a round is refused (FS505) when this
    machine cannot enforce it. "off" = the worker runs with the daemon's user, files and network."""
    round_process: Literal["job", "round"] = "job"
    """How plan code's processes are shared (each is forked from the warm worker and confined before plan code
    runs): "job" = a job's rounds run one after another in one process while the researcher, job, plan, dataset
    and config stay the same (as NVIDIA FLARE's process per job); any other round gets a fresh one, so nothing a
    plan leaves in memory reaches another job. "round" = a fresh process every round (about 40 ms of CPU more
    a round: `worker_process._job_rounds`)."""
    worker_nice: int = Field(10, ge=0, le=19)
    """The niceness plan code runs at (the worker and its rounds' processes; the daemon keeps its own), as `nice`
    counts: 0 = the daemon's priority, 19 = the lowest. A plan that takes every core cannot then starve the
    daemon's MQTT keep-alive, its transfers or the GUI on the same machine, and what the node moves runs as soon
    as it is ready. Measured (`bench/scaling.py --model large --ks 10`, alternated twice, 2026-12-02): round
    5.29 / 4.68 s at 0, 5.03 / 4.14 s at 10; the file store's and the workers' CPU a round fell too (fewer
    switches); K=3 small 0.071 / 0.072 -> 0.060 / 0.059 s. A process can raise its own niceness, never lower
    it: plan code cannot undo this."""
    threads: int | None = Field(None, ge=1)
    """CPU threads torch uses in a round; unset = torch's default (every core). Nodes sharing a machine
    should split the cores: oversubscribed OpenMP threads make a round many times slower."""
    request_max_age_s: float = Field(300.0, gt=0)
    """A request stamped earlier than this is refused as a replay. Researchers stamp every copy they
    (re-)send, so this bounds clock skew plus broker delay, not the length of a round."""
    clock_skew_s: float = Field(60.0, ge=0)
    """How far ahead of this node's clock a request's timestamp may be (and is added to the maximum age).
    Keep the parties' clocks in sync with NTP; a minute of slack covers ordinary drift."""
    allow_custom_loop: list[Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]] = Field(default_factory=list)
    """sha256 of plans allowed to run their own `training_routine`: the node cannot enforce its caps, DP,
    wall-clock limit or batch policy on such a loop (the reply says so in `applied_caps`). Refused under
    `[dp] required` whatever this list says."""
    researchers: list[str] | None = None
    """Researchers whose requests this node runs (FS107 otherwise); unset = every researcher the consortium's
    signed roster names; `[]` = none (`node/access.py`)."""


class Limits(BaseModel):
    """Caps the node applies to every round whatever the researcher asks."""

    model_config = ConfigDict(extra="forbid")
    max_epochs: int | None = Field(None, ge=1)
    max_num_updates: int | None = Field(None, ge=1)
    allow_gpu: bool = False
    max_batch_size: int | None = Field(None, ge=1)
    max_train_seconds: float | None = Field(None, gt=0)
    """Wall-clock budget of a round's training loop: the trainer stops after the step that passes it and
    reports it in `applied_caps`. The step that crosses it runs to its end (a step is not interruptible)."""
    sandbox_memory_mb: int = Field(4096, ge=64)
    sandbox_cpu_s: int = Field(3600, ge=1)
    sandbox_file_mb: int = Field(1024, ge=1)
    """A round's memory (address space beyond the warm worker's), CPU seconds and largest file, in the sandbox."""
    max_bad_batches: int = Field(0, ge=0)
    """Batches whose `training_step` raises that a round may skip (counted as `skipped_batches`); one more
    fails the round. 0 = fail at the first, as before."""
    max_metrics: int = Field(32, ge=1, le=1024)
    """Metrics a plan's `testing_step` may report (more are left out with a WARNING: `node/metric_bounds.py`)."""
    max_metric_name: int = Field(64, ge=1, le=256)
    """Characters in a metric's name; a longer name is left out."""


class DPPolicy(BaseModel):
    """The node's differential-privacy policy (`[dp]`): with `required`, every round trains with DP; whenever DP
    runs, the noise multiplier is at least `min_noise_multiplier`, the clipping norm at most `max_grad_norm` and
    delta at most `delta`, a weaker request being raised to them or refused (`weaker_request`). With
    `epsilon_budget` (or a dataset's own, `fedsilo node dataset budget`), every round of a dataset trains with DP
    and the epsilon its rounds spend, composed across experiments and researchers, stays within the budget.

        [dp]
        required = true
        min_noise_multiplier = 1.0   # Opacus' noise_multiplier; `sigma` is read as well
        max_grad_norm = 1.0          # Opacus' max_grad_norm; `clip` is read as well
        delta = 1e-5
        weaker_request = "refuse"
        epsilon_budget = 8.0
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    required: bool = False
    min_noise_multiplier: float | None = Field(
        None, gt=0, validation_alias=AliasChoices("min_noise_multiplier", "sigma"))  # fmt: skip
    max_grad_norm: float | None = Field(None, gt=0, validation_alias=AliasChoices("max_grad_norm", "clip"))
    delta: float = Field(1e-5, gt=0, lt=1)
    """The largest delta a round may use; a dataset's budget is (epsilon, this delta) unless set per dataset."""
    weaker_request: Literal["raise", "refuse"] = "raise"
    """A researcher's dp_args weaker than the floors (or none where DP is required): raised to them and reported
    in the reply's `applied_caps.dp_args`, or refused with DP_REQUEST_REFUSED (FS700)."""
    epsilon_budget: float | None = Field(None, gt=0)
    """Epsilon each dataset may spend in all (per-dataset override: `fedsilo node dataset budget ID --epsilon E`);
    a round that would pass it is refused with PRIVACY_BUDGET_EXCEEDED (FS701). Unset = no budget."""
    update_clip: float | None = Field(None, gt=0)
    """Local DP on the update, applied by the daemon after the worker returns and whatever loop ran (as
    Flower's LocalDpMod): the L2 norm of (update - received global parameters), over every floating-point
    tensor, is clipped to this. Unset = no clipping."""
    update_noise: float | None = Field(None, ge=0)
    """Noise multiplier: Gaussian noise of std `update_noise * update_clip` is added to every floating-point
    entry of the clipped update. Requires `update_clip`. Unset = no noise."""

    @model_validator(mode="after")
    def _complete(self) -> DPPolicy:
        if self.required and (self.min_noise_multiplier is None or self.max_grad_norm is None):
            raise ValueError("with required = true, both min_noise_multiplier (sigma) and max_grad_norm (clip) "
                             "must be set")  # fmt: skip
        if self.update_noise is not None and self.update_clip is None:
            raise ValueError("update_noise is a multiplier of update_clip: set update_clip too")
        return self


class NodeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    node: NodeSection
    limits: Limits = Field(default_factory=Limits)
    dp: DPPolicy = Field(default_factory=DPPolicy)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    _dir: Path | None = PrivateAttr(default=None)

    @property
    def dir(self) -> Path:
        if self._dir is None:
            raise ValueError("this NodeConfig has no node directory; use NodeConfig.load or create")
        return self._dir

    @property
    def paths(self) -> NodePaths:
        return node_paths(self.dir)

    @classmethod
    def load(cls, nodedir: str | Path) -> NodeConfig:
        paths = node_paths(nodedir)
        if not paths.config.is_file():
            raise_missing(paths)
        cfg = validate(cls, read_toml(paths.config), str(paths.config))
        cfg._dir = paths.root
        return cfg

    @classmethod
    def create(cls, nodedir: str | Path, data: dict[str, Any]) -> NodeConfig:
        paths = node_paths(nodedir)
        cfg = validate(cls, data, str(paths.config))
        cfg._dir = paths.root
        return cfg

    def save(self) -> Path:
        path = self.paths.config
        write_toml(path, self.model_dump(mode="json"))
        return path


def raise_missing(paths: NodePaths) -> None:
    from fedsilo.common.errors import ConfigError

    raise ConfigError(
        f"{paths.root} is not a node directory (no config.toml); create one with "
        f"`fedsilo node init --dir {paths.root} --name NAME --network NETDIR`"
    )
