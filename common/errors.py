"""Exceptions and the fixed catalogue of error codes that travel between parties."""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Codes carried by error replies; the text next to each is what a person should do next."""

    MALFORMED_MESSAGE = "FS100"
    UNSUPPORTED_PROTOCOL = "FS101"
    SENDER_MISMATCH = "FS102"
    REQUEST_EXPIRED = "FS103"
    SIGNATURE_INVALID = "FS104"
    UNKNOWN_SIGNER = "FS105"
    SIGNER_ROLE = "FS106"
    RESEARCHER_NOT_ALLOWED = "FS107"
    UNKNOWN_DATASET = "FS200"
    DATASET_LOAD_FAILED = "FS201"
    DATASET_NOT_ALLOWED = "FS210"
    DATASET_TOO_SMALL = "FS202"
    PLAN_NOT_APPROVED = "FS300"
    PLAN_REJECTED = "FS301"
    PLAN_HASH_MISMATCH = "FS302"
    PLAN_INVALID = "FS303"
    CUSTOM_LOOP_REFUSED = "FS304"
    PARAMS_INVALID = "FS400"
    TRAINING_FAILED = "FS500"
    WORKER_CRASHED = "FS501"
    TRAINING_ARGS_INVALID = "FS502"
    NON_FINITE = "FS503"
    RESOURCE_LIMIT = "FS504"
    SANDBOX_UNAVAILABLE = "FS505"
    TRANSFER_FAILED = "FS600"
    DP_REQUEST_REFUSED = "FS700"
    PRIVACY_BUDGET_EXCEEDED = "FS701"
    SECAGG_FAILED = "FS800"
    SECAGG_REQUIRED = "FS801"
    INTERNAL = "FS900"


ERROR_HELP: dict[ErrorCode, str] = {
    ErrorCode.MALFORMED_MESSAGE: "the message did not match the protocol schema; check versions on both sides",
    ErrorCode.UNSUPPORTED_PROTOCOL: "upgrade the older side so both speak the same protocol version",
    ErrorCode.SENDER_MISMATCH: "a message's sender must be the party whose credentials published it",
    ErrorCode.SIGNATURE_INVALID: "messages must carry a valid Ed25519 signature by their sender (credentials made "
    "before signed messages lack `signing_key`: re-issue them)",
    ErrorCode.UNKNOWN_SIGNER: "the signer is not in the consortium roster this party holds; ask the network operator "
    "to add the party (`fedsilo network party add`), which publishes a new roster",
    ErrorCode.SIGNER_ROLE: "the signer's roster role may not send this (nodes answer researchers, researchers ask "
    "nodes)",
    ErrorCode.RESEARCHER_NOT_ALLOWED: "this node takes requests only from the researchers in its `[node] researchers`; "
    "ask its administrator",
    ErrorCode.REQUEST_EXPIRED: "the request is too old or from the future: check both machines' clocks (NTP)",
    ErrorCode.UNKNOWN_DATASET: "list the node's datasets (`fedsilo node dataset list`) and use a registered id",
    ErrorCode.DATASET_LOAD_FAILED: "the node administrator should check the dataset path and format",
    ErrorCode.DATASET_NOT_ALLOWED: "the data manager has not allowed this researcher on this dataset "
    "(`fedsilo node dataset allow`)",
    ErrorCode.DATASET_TOO_SMALL: "the dataset holds fewer samples than the node's minimum ([node] min_count): "
    "train on other nodes or datasets, or ask the node for more data",
    ErrorCode.PLAN_NOT_APPROVED: "ask the node's data manager to review and approve the plan with this hash",
    ErrorCode.PLAN_REJECTED: "the data manager rejected this plan; read their note and submit a revised plan",
    ErrorCode.PLAN_HASH_MISMATCH: "the plan changed in transit; re-send it",
    ErrorCode.PLAN_INVALID: "the plan source could not be loaded; run it locally first",
    ErrorCode.CUSTOM_LOOP_REFUSED: "the plan defines its own training loop (training_routine or another method the "
    "node owns): move the loop body into training_step, or ask the data manager to allow it (allow_custom_loop)",
    ErrorCode.PARAMS_INVALID: "parameters must be safetensors produced by fedsilo",
    ErrorCode.TRAINING_FAILED: "the training plan raised on the node; the node log holds the traceback",
    ErrorCode.WORKER_CRASHED: "the node's training worker died; it has been restarted",
    ErrorCode.TRAINING_ARGS_INVALID: "fix the training arguments named in the message",
    ErrorCode.NON_FINITE: "training produced NaN or infinity: look for missing values in the dataset's summary "
    "(fill them in the plan), or lower the learning rate",
    ErrorCode.RESOURCE_LIMIT: "the round passed the node's sandbox limits (memory, CPU time, file size or processes: "
    "the message says which); use less, or ask the node for more ([limits] sandbox_*)",
    ErrorCode.SANDBOX_UNAVAILABLE: "the node cannot enforce the sandbox its config asks for (bubblewrap missing or "
    "user namespaces refused); its administrator must fix that, or set [node] sandbox = \"off\"",
    ErrorCode.TRANSFER_FAILED: "the file store could not be reached or refused the transfer",
    ErrorCode.DP_REQUEST_REFUSED: "the node requires differential privacy at least as strong as its [dp] policy: "
    "ask dp_args with the sigma, clip and delta the message names",
    ErrorCode.PRIVACY_BUDGET_EXCEEDED: "the dataset's epsilon budget would be exceeded: ask fewer steps, more noise "
    "or a lower sampling rate (the message gives the remaining budget), or ask the node for more budget",
    ErrorCode.SECAGG_FAILED: "a secure-aggregation stage was refused or failed (the message says which); the "
    "round goes on without that node, or fails when fewer than the threshold remain",
    ErrorCode.SECAGG_REQUIRED: "this node trains only with secure aggregation: `Experiment(..., "
    "secure_aggregation=True)` with FedAvg, FedProx or a FedOpt aggregator",
    ErrorCode.INTERNAL: "an unexpected error; the node log holds the traceback under the request id",
}


class FedsiloError(Exception):
    """Base of every error fedsilo raises on purpose."""


class ConfigError(FedsiloError):
    """A configuration value is missing or invalid; the message names the key."""


class SerializationError(FedsiloError):
    """Bytes that should hold parameters do not (not safetensors, wrong shapes, tampered)."""


class NonFiniteError(FedsiloError):
    """Training produced NaN or infinity (a loss, or the parameters); the message names the step."""


class PlanSourceError(FedsiloError):
    """A training plan's source could not be extracted or loaded."""


class TransferError(FedsiloError):
    """A file-store upload or download failed."""


class RemoteError(FedsiloError):
    """An error reply from a node, readable in a notebook."""

    def __init__(self, node: str, code: str, message: str, stage: str = "", request_id: str = "") -> None:
        self.node, self.code, self.stage, self.request_id = node, code, stage, request_id
        self.remote_message = message
        where = f" during {stage}" if stage else ""
        hint = ERROR_HELP.get(ErrorCode(code), "") if code in ErrorCode._value2member_map_ else ""
        text = f"node '{node}'{where}: [{code}] {message}"
        if hint:
            text += f" -> {hint}"
        super().__init__(text)


class PlanHashMismatch(FedsiloError):
    """A plan's bytes do not hash to the sha256 it was sent under."""


class PlanNotText(PlanSourceError):
    """A plan's bytes are not UTF-8 text."""


class PlanNotApproved(FedsiloError):
    """The plan is not approved on this node (unknown plans are recorded as pending)."""


class PlanRejected(FedsiloError):
    """The node's data manager rejected (or revoked) the plan."""


class UpdateRefused(SerializationError):
    """The update a worker returned failed the daemon's checks (not safetensors, or not the received model's
    names, shapes and dtypes)."""


class WorkerProtocolError(FedsiloError):
    """The training worker sent something that is not a frame of the daemon-worker protocol: it runs plan
    code, so the daemon treats it as untrusted and restarts it."""
