"""Typed protocol messages. Every message received is validated with `parse_message`."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from fedsilo.common.algorithms import AlgorithmError, AlgorithmSpec
from fedsilo.common.codecs import Compression, plain_for_masks
from fedsilo.common.errors import ErrorCode
from fedsilo.common.safejson import JSONLimitError, check_json
from fedsilo.common.signing import MAX_ROSTER_BYTES
from fedsilo.common.training_args import TrainingArgs, TrainingArgsError

from .message_base import _ID, _SHA, ATTACHED, INLINE_BLOB_BYTES, Attached, BlobRef, Message, Reply, b64_length
from .message_base import new_id as new_id
from .secagg_messages import (
    SecaggKeysReply,
    SecaggSetupRequest,
    SecaggShareRequest,
    SecaggSharesReply,
    SecaggTask,
    SecaggUnmaskReply,
    SecaggUnmaskRequest,
)

MAX_MESSAGE_BYTES = b64_length(INLINE_BLOB_BYTES) + 256 * 1024
"""One inline blob's base64 (`INLINE_BLOB_BYTES`: a small model or update) plus the 256 KiB every message had
before inline blobs; anything larger is refused before parsing. Senders inline at most `INLINE_BLOB_BYTES` in
total per message, the rest goes through the file store."""
MAX_PUBLISH_BYTES = max(MAX_MESSAGE_BYTES, MAX_ROSTER_BYTES) + 16 * 1024
"""What a broker takes in one PUBLISH payload (a message or the roster, plus its signature): both brokers close the
connection of a party that sends more (`network/broker.py`), so a party with valid credentials cannot push large
payloads through the broker into other parties' queues; receivers refuse anything over MAX_MESSAGE_BYTES anyway."""
MAX_MESSAGE_DEPTH = 16
"""fedsilo's messages nest at most 5 levels; deeper JSON is refused before any parser recurses into it."""


# ---------------------------------------------------------------------------------------- requests
class SearchRequest(Message):
    """Which nodes hold datasets carrying all these tags?"""

    kind: Literal["search_request"] = "search_request"
    tags: list[str] = Field(min_length=1)


class PingRequest(Message):
    kind: Literal["ping_request"] = "ping_request"


class ListRequest(Message):
    kind: Literal["list_request"] = "list_request"


def _plan_by_sha256(ref: BlobRef) -> BlobRef:
    if ref.sha256 is None:
        raise ValueError("a plan is named by its sha256 (the hash its data manager approves), not by "
                         f"{ref.algorithm}")  # fmt: skip
    return ref


PlanRef = Annotated[BlobRef, AfterValidator(_plan_by_sha256)]
"""A plan's blob: always named by sha256, the plan's identity (`common.plan_source.plan_hash`)."""

_BLOB_KEY = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_]*$")]


def _blobs_with_params(blobs: dict[str, BlobRef]) -> dict[str, BlobRef]:
    if "params" not in blobs:
        raise ValueError("blobs must hold 'params'")
    if len(blobs) > 16:
        raise ValueError("at most 16 blobs")
    return blobs


class TaskRequest(Message):
    """What the node's worker runs from its durable queue: a training round (`TrainRequest`) or an
    evaluation (`EvaluateRequest`). Both start from `blobs["params"]` with the plan on `dataset_id`; the
    daemon checks, queues, acks and re-answers both alike. `training_args` is validated here, once, on
    receipt: a bad value is refused before anything is queued, with the key named."""

    job_id: _ID
    round: int = Field(ge=0)
    dataset_id: _ID
    plan: PlanRef
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
    plan: PlanRef
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
    """A queued task back from its JSON or wire form (written by the daemon after `parse_message` accepted it)."""
    head, attached = split_attached(payload)
    return _TASK_ADAPTER.validate_json(head, context=None if attached is None else {"attached": attached})


def split_attached(payload: bytes | bytearray | str) -> tuple[bytes | bytearray | str, Attached | None]:
    """A wire form's JSON and its attached bytes (`Message.to_wire`); a payload without them as it is, and None."""
    if isinstance(payload, str) or ATTACHED not in payload:
        return payload, None
    view = memoryview(payload)
    cut = payload.index(ATTACHED)
    return bytes(view[:cut]), Attached(view[cut + 1 :])


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
    """Validate raw bytes into a message; raise `MessageError` with a short reason otherwise. The bytes are a
    message's JSON, or its wire form with inline blobs attached after it (`Message.to_wire`).

    Size and nesting depth are bounded before any parser runs; nothing here raises anything else."""
    if len(payload) > MAX_MESSAGE_BYTES:  # the whole payload, its attached bytes too (check_json sees the JSON)
        raise MessageError(f"refused: {len(payload)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit",
                           *_salvage_ids(payload))  # fmt: skip
    head, attached = split_attached(payload)
    try:
        check_json(head, max_bytes=MAX_MESSAGE_BYTES, max_depth=MAX_MESSAGE_DEPTH)
    except JSONLimitError as exc:
        raise MessageError(f"refused: {exc}", *_salvage_ids(payload)) from None
    try:
        message = _ADAPTER.validate_json(head, context=None if attached is None else {"attached": attached})
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ())]
        where = ".".join(loc)
        raise MessageError(
            f"invalid message: {where}: {first.get('msg')}", *_salvage_ids(payload), field=".".join(loc[1:])
        ) from None
    if attached is not None and attached.taken != len(attached.view):
        raise MessageError(f"invalid message: {len(attached.view) - attached.taken} attached bytes no blob ref "
                           "names", *_salvage_ids(payload))  # fmt: skip
    return message


_SALVAGE = {k: re.compile(rf'"{k}"\s*:\s*"([A-Za-z0-9_.:\-]{{1,128}})"') for k in ("sender", "request_id")}
_SALVAGE_BYTES = 8192


def _salvage_ids(payload: bytes | bytearray | str) -> tuple[str, str]:
    """Best effort, without parsing: the sender and request id of an invalid message, to answer it.

    A regular expression over the first 8 KiB: bounded work whatever the payload (bad JSON, huge, deep)."""
    head = payload[:_SALVAGE_BYTES]
    text = head if isinstance(head, str) else bytes(head).decode("utf-8", "replace")
    found = [_SALVAGE[k].search(text) for k in ("sender", "request_id")]
    return tuple(m.group(1) if m else "" for m in found)  # type: ignore[return-value]
