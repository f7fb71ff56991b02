"""Secure aggregation's stage messages (common/secagg, node/secagg.py, researcher/secagg.py); `messages.py`
puts them in the catalogue."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from fedsilo.common.secagg.config import SecaggConfig

from .message_base import _ID, Message, Reply

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
