"""Typed protocol messages. Every message received is validated with `parse_message`."""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, TypeAdapter, ValidationError, field_validator

from fedsilo.common import PROTOCOL_VERSION
from fedsilo.common.algorithms import AlgorithmError, AlgorithmSpec
from fedsilo.common.codecs import Compression, plain_for_masks
from fedsilo.common.errors import ErrorCode
from fedsilo.common.safejson import JSONLimitError, check_json
from fedsilo.common.secagg.config import SecaggConfig
from fedsilo.common.training_args import TrainingArgs, TrainingArgsError

MAX_MESSAGE_BYTES = 256 * 1024
"""Messages carry references, never payloads; anything larger is refused before parsing."""
MAX_MESSAGE_DEPTH = 16
"""fedsilo's messages nest at most 5 levels; deeper JSON is refused before any parser recurses into it."""

_ID = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$")]
_SHA = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


def new_id() -> str:
    return uuid.uuid4().hex


class BlobRef(BaseModel):
    """A file-store object: content-addressed, so its id is its sha256."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    sha256: _SHA
    size: int = Field(ge=0)


class Message(BaseModel):
    """Base of every message; NaN and infinities are refused in every float field (JSON has neither)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    protocol_version: int = PROTOCOL_VERSION
    request_id: _ID = Field(default_factory=new_id)
    sender: _ID
    timestamp: float = Field(default_factory=time.time)
    _signature: tuple[str, str] | None = PrivateAttr(None)
    """(signer, base64 signature) once `Messaging` verified the bytes this was parsed from; never sent."""

    def to_json(self) -> bytes:
        return self.model_dump_json().encode("utf-8")

    @property
    def signer(self) -> str:
        """The party whose signature on this message was verified ("" when none was: an unsigned channel)."""
        return self._signature[0] if self._signature else ""

    @property
    def signature(self) -> str:
        return self._signature[1] if self._signature else ""


# ---------------------------------------------------------------------------------------- requests
class SearchRequest(Message):
    """Which nodes hold datasets carrying all these tags?"""

    kind: Literal["search_request"] = "search_request"
    tags: list[str] = Field(min_length=1)


class PingRequest(Message):
    kind: Literal["ping_request"] = "ping_request"


class ListRequest(Message):
    kind: Literal["list_request"] = "list_request"


_BLOB_KEY = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_]*$")]


def _blobs_with_params(blobs: dict[str, BlobRef]) -> dict[str, BlobRef]:
    if "params" not in blobs:
        raise ValueError("blobs must hold 'params'")
    if len(blobs) > 16:
        raise ValueError("at most 16 blobs")
    return blobs


_HEX32 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
_BOX = Annotated[str, Field(min_length=2, max_length=512, pattern=r"^[0-9a-f]+$")]
_SHARE = Annotated[str, Field(pattern=r"^[0-9a-f]{136}$")]
_SIG = Annotated[str, Field(pattern=r"^[A-Za-z0-9+/]{86}==$")]


class SecaggKeys(BaseModel):
    """A node's two x25519 public keys of a round (hex): `c` encrypts shares to it, `s` derives its masks; `sig`:
    the node's Ed25519 signature over them (`node/secagg_auth.py`), which every other node checks."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    c: _HEX32
    s: _HEX32
    sig: _SIG | None = None


class SecaggTask(BaseModel):
    """In a TrainRequest: the encrypted shares the node's neighbours sent it (sender -> hex box); the node masks
    its update with exactly these senders (common/secagg)."""

    model_config = ConfigDict(extra="forbid")
    shares: dict[_ID, _BOX] = Field(max_length=1000)


class TaskRequest(Message):
    """What the node's worker runs from its durable queue: a training round (`TrainRequest`) or an
    evaluation (`EvaluateRequest`). Both start from `blobs["params"]` with the plan on `dataset_id`; the
    daemon checks, queues, acks and re-answers both alike. `training_args` is validated here, once, on
    receipt: a bad value is refused before anything is queued, with the key named."""

    job_id: _ID
    round: int = Field(ge=0)
    dataset_id: _ID
    plan: BlobRef
    plan_name: str = Field(max_length=200)
    blobs: dict[_BLOB_KEY, BlobRef]
    training_args: TrainingArgs = Field(default_factory=TrainingArgs)
    model_args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("training_args", mode="before")
    @classmethod
    def _training_args(cls, value: Any) -> TrainingArgs:
        try:  # TrainingArgs.parse names the right key for a Fed-BioMed habit or a typo
            return TrainingArgs.parse(value)
        except TrainingArgsError as exc:
            raise ValueError(str(exc)) from None

    @property
    def params(self) -> BlobRef:
        """The global model this task starts from."""
        return self.blobs["params"]


class TrainRequest(TaskRequest):
    """Train `dataset_id` with the plan, starting from `blobs["params"]`; an algorithm may add blobs (SCAFFOLD's
    "control") and its typed node-side config, validated here like `training_args`."""

    kind: Literal["train_request"] = "train_request"
    algorithm: AlgorithmSpec = Field(default_factory=AlgorithmSpec)
    secagg: SecaggTask | None = None
    """Set under secure aggregation: the node uploads its update masked (`node/secagg.py`)."""
    compression: Compression | None = None  # the update's codec (common/codecs.py, node/compression.py)

    _check_blobs = field_validator("blobs")(_blobs_with_params)
    _plain_for_masks = field_validator("compression")(plain_for_masks)

    @field_validator("algorithm")
    @classmethod
    def _algorithm(cls, spec: AlgorithmSpec) -> AlgorithmSpec:
        try:
            spec.parse()
        except AlgorithmError as exc:
            raise ValueError(str(exc)) from None
        return spec


class EvaluateRequest(TaskRequest):
    """Evaluate the global model `blobs["params"]` (its only blob) with the plan's `testing_step` on the node's
    test split of `dataset_id` (`training_args.test_ratio` and `random_seed`, the split training rounds use;
    the whole dataset when `test_ratio` is 0). No training, and no update leaves the node: the answer is an
    `EvaluateReply`, which has no blob. Approval and dataset checks are those of a training round."""

    kind: Literal["evaluate_request"] = "evaluate_request"

    @field_validator("blobs")
    @classmethod
    def _only_params(cls, blobs: dict[str, BlobRef]) -> dict[str, BlobRef]:
        if set(blobs) != {"params"}:
            raise ValueError("an evaluation takes exactly one blob, 'params'")
        return blobs


class ApprovalRequest(Message):
    """Submit a plan for review; the node stores it as pending."""

    kind: Literal["approval_request"] = "approval_request"
    plan: BlobRef
    plan_name: str = Field(max_length=200)
    description: str = Field(default="", max_length=4000)


class PlanStatusRequest(Message):
    kind: Literal["plan_status_request"] = "plan_status_request"
    plan_sha256: _SHA


# ----------------------------------------------------------------------------------------- replies
class DatasetInfo(BaseModel):
    """What a node tells researchers about a dataset: metadata, never data or paths."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    dataset_id: str
    name: str
    tags: list[str]
    data_type: str
    shape: list[int] = Field(default_factory=list)
    description: str = ""
    summary: dict[str, Any] = Field(default_factory=dict)


class DeviceReport(BaseModel):
    """Where a round ran (`node/device.py`): `used` ("cpu", "cuda:0"), whether the researcher asked for a GPU
    (`use_gpu`), and why the CPU when it did (`fallback`: the node refuses GPUs, or has none)."""

    model_config = ConfigDict(extra="forbid")
    used: str = Field(max_length=32)
    gpu_requested: bool
    fallback: str = Field("", max_length=500)


class Reply(Message):
    """Base of every answer; build one with `for_request`, which sets who answers and to what."""

    node_id: _ID
    node_name: str = ""
    in_reply_to: _ID

    @classmethod
    def for_request(cls, request: Message | str, node_id: str, node_name: str = "", **fields: Any) -> Self:
        """A reply of this kind to `request` (or to a request id), from `node_id`.

            TaskAck.for_request(req, "hospital-a", job_id=req.job_id, round=req.round)
        """
        rid = request if isinstance(request, str) else request.request_id
        return cls(sender=node_id, node_id=node_id, node_name=node_name, in_reply_to=rid, **fields)


class SearchReply(Reply):
    kind: Literal["search_reply"] = "search_reply"
    datasets: list[DatasetInfo]


class PingReply(Reply):
    kind: Literal["ping_reply"] = "ping_reply"
    version: str
    busy: bool = False


class ListReply(Reply):
    kind: Literal["list_reply"] = "list_reply"
    datasets: list[DatasetInfo]


class TaskAck(Reply):
    """The node validated a train request and put it on its durable queue."""

    kind: Literal["task_ack"] = "task_ack"
    job_id: str
    round: int


class TrainReply(Reply):
    """The node's update: `blobs["params"]` (its local model) and what its algorithm returns besides."""

    kind: Literal["train_reply"] = "train_reply"
    job_id: str
    round: int
    dataset_id: str
    blobs: dict[_BLOB_KEY, BlobRef]
    sample_size: int = Field(ge=0)
    timings: dict[str, float] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    applied_caps: dict[str, Any] = Field(default_factory=dict)
    test_samples: int = Field(0, ge=0)
    """The size of the test split that `test_*` (local update) and `global_*` (received model) metrics were
    computed on: their weight in the researcher's means (0: no test metric)."""
    device: DeviceReport | None = None

    _check_blobs = field_validator("blobs")(_blobs_with_params)

    @property
    def params(self) -> BlobRef:
        """The node's updated model."""
        return self.blobs["params"]


class EvaluateReply(Reply):
    """The metrics of the received model on the node's test split (`sample_size` samples); numbers only."""

    kind: Literal["evaluate_reply"] = "evaluate_reply"
    job_id: str
    round: int
    dataset_id: str
    sample_size: int = Field(ge=0)
    timings: dict[str, float] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    device: DeviceReport | None = None


class ApprovalReply(Reply):
    kind: Literal["approval_reply"] = "approval_reply"
    plan_sha256: _SHA
    status: Literal["pending", "approved", "rejected"]


class PlanStatusReply(Reply):
    kind: Literal["plan_status_reply"] = "plan_status_reply"
    plan_sha256: _SHA
    status: Literal["unknown", "pending", "approved", "rejected"]
    approval_required: bool


class ErrorReply(Reply):
    kind: Literal["error"] = "error"
    code: ErrorCode
    message: str = Field(max_length=4000)
    stage: str = ""
    job_id: str = ""
    round: int | None = None


# ------------------------------------------------------ secure aggregation stages (common/secagg, node/secagg.py)
class SecaggRequest(Message):
    job_id: _ID
    round: int = Field(ge=0)


class SecaggSetupRequest(SecaggRequest):
    """Start a round's secure aggregation among `nodes`; the node answers its public keys."""

    kind: Literal["secagg_setup_request"] = "secagg_setup_request"
    nodes: list[_ID] = Field(min_length=2, max_length=1000)
    config: SecaggConfig


class SecaggShareRequest(SecaggRequest):
    """Every party's public keys; the node answers its encrypted shares and their commitments."""

    kind: Literal["secagg_share_request"] = "secagg_share_request"
    keys: dict[_ID, SecaggKeys] = Field(max_length=1000)


class SecaggUnmaskRequest(SecaggRequest):
    """Who sent a masked input and who did not; the node answers the b shares of the first, s shares of the rest,
    once `consistency` holds threshold survivors' signatures of this list (`check_only`: asks for this node's)."""

    kind: Literal["secagg_unmask_request"] = "secagg_unmask_request"
    survivors: list[_ID] = Field(max_length=1000)
    dropped: list[_ID] = Field(max_length=1000)
    check_only: bool = False
    consistency: dict[_ID, _SIG] = Field(default_factory=dict, max_length=1000)


class SecaggReply(Reply):
    job_id: str
    round: int


class SecaggKeysReply(SecaggReply):
    kind: Literal["secagg_keys_reply"] = "secagg_keys_reply"
    keys: SecaggKeys


class SecaggSharesReply(SecaggReply):
    kind: Literal["secagg_shares_reply"] = "secagg_shares_reply"
    boxes: dict[_ID, _BOX] = Field(max_length=1000)
    commitments: dict[_ID, tuple[_HEX32, _HEX32]] = Field(max_length=1000)


class SecaggUnmaskReply(SecaggReply):
    kind: Literal["secagg_unmask_reply"] = "secagg_unmask_reply"
    b_shares: dict[_ID, _SHARE] = Field(max_length=1000)
    s_shares: dict[_ID, _SHARE] = Field(max_length=1000)
    consistency: _SIG | None = None


# -------------------------------------------------------------------------------- node-side events
class LogMessage(Message):
    kind: Literal["log"] = "log"
    node_id: _ID
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"]
    text: str = Field(max_length=4000)
    job_id: str = ""


class ScalarMessage(Message):
    """A training metric streamed while a round runs (loss every `log_interval` steps)."""

    kind: Literal["scalar"] = "scalar"
    node_id: _ID
    job_id: str
    round: int
    dataset_id: str
    key: str
    value: float
    step: int
    epoch: int = 1
    num_samples: int = 0
    total_samples: int = 0
    train: bool = True


class Presence(Message):
    """Retained on the presence topic; the broker publishes `online=False` as the node's last will."""

    kind: Literal["presence"] = "presence"
    node_id: _ID
    node_name: str = ""
    online: bool
    version: str = ""


AnyMessage = Annotated[
    SearchRequest
    | PingRequest
    | ListRequest
    | TrainRequest
    | EvaluateRequest
    | ApprovalRequest
    | PlanStatusRequest
    | SearchReply
    | PingReply
    | ListReply
    | TaskAck
    | TrainReply
    | EvaluateReply
    | ApprovalReply
    | PlanStatusReply
    | ErrorReply
    | SecaggSetupRequest
    | SecaggShareRequest
    | SecaggUnmaskRequest
    | SecaggKeysReply
    | SecaggSharesReply
    | SecaggUnmaskReply
    | LogMessage
    | ScalarMessage
    | Presence,
    Field(discriminator="kind"),
]
_ADAPTER: TypeAdapter[AnyMessage] = TypeAdapter(AnyMessage)
_TASK_ADAPTER: TypeAdapter[TrainRequest | EvaluateRequest] = TypeAdapter(
    Annotated[TrainRequest | EvaluateRequest, Field(discriminator="kind")]
)


def parse_task(payload: bytes | str) -> TrainRequest | EvaluateRequest:
    """A queued task back from its JSON (written by the daemon after `parse_message` accepted it)."""
    return _TASK_ADAPTER.validate_json(payload)


class MessageError(ValueError):
    """A received payload is not a valid message; `sender`/`request_id` are filled when readable."""

    def __init__(self, reason: str, sender: str = "", request_id: str = "", field: str = "") -> None:
        super().__init__(reason)
        self.reason, self.sender, self.request_id = reason, sender, request_id
        self.field = field
        """Where validation failed, after the kind: e.g. `training_args` or `algorithm.config`."""


class UntrustedMessage(MessageError):
    """A payload refused before parsing: unsigned, badly signed, signed by a party the roster does not name
    or names with another role, or by another party than the one that published it. `code` is the answer."""

    def __init__(self, reason: str, code: ErrorCode, signer: str, payload: bytes | bytearray | str) -> None:
        super().__init__(reason, *_salvage_ids(payload))
        self.code, self.signer = code, signer


def parse_message(payload: bytes | bytearray | str) -> AnyMessage:
    """Validate raw bytes into a message; raise `MessageError` with a short reason otherwise.

    Size and nesting depth are bounded before any parser runs; nothing here raises anything else."""
    try:
        check_json(payload, max_bytes=MAX_MESSAGE_BYTES, max_depth=MAX_MESSAGE_DEPTH)
    except JSONLimitError as exc:
        raise MessageError(f"refused: {exc}", *_salvage_ids(payload)) from None
    try:
        return _ADAPTER.validate_json(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ())]
        where = ".".join(loc)
        raise MessageError(
            f"invalid message: {where}: {first.get('msg')}", *_salvage_ids(payload), field=".".join(loc[1:])
        ) from None


_SALVAGE = {k: re.compile(rf'"{k}"\s*:\s*"([A-Za-z0-9_.:\-]{{1,128}})"') for k in ("sender", "request_id")}
_SALVAGE_BYTES = 8192


def _salvage_ids(payload: bytes | bytearray | str) -> tuple[str, str]:
    """Best effort, without parsing: the sender and request id of an invalid message, to answer it.

    A regular expression over the first 8 KiB: bounded work whatever the payload (bad JSON, huge, deep)."""
    head = payload[:_SALVAGE_BYTES]
    text = head if isinstance(head, str) else bytes(head).decode("utf-8", "replace")
    found = [_SALVAGE[k].search(text) for k in ("sender", "request_id")]
    return tuple(m.group(1) if m else "" for m in found)  # type: ignore[return-value]
