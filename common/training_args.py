"""Training arguments: data sent with every round, validated on both sides (unknown keys refused)."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import FedsiloError


class TrainingArgsError(FedsiloError):
    """Training arguments failed validation; the message names the key."""


_DP_KEYS = {"sigma", "clip", "delta", "type", "sample_rate", "max_steps"}
"""sample_rate, max_steps: the bound a node accounts a round at under a privacy budget (node/dp_policy.py)."""

DEFAULT_BATCH_SIZE = 32
"""The loader's batch size when neither the training arguments nor the plan's DataManager set one."""

# Keys researchers bring from Fed-BioMed (its TrainingArgs, several versions) and other habits:
# what each one is called here, or why there is no such key.
FEDBIOMED_ALIASES: dict[str, str] = {
    "batch_maxnum": "Fed-BioMed's 'batch_maxnum' is 'num_updates' here",
    "dp": "differential privacy is 'dp_args' here",
    "lr": "the learning rate goes inside 'optimizer_args', e.g. {'optimizer_args': {'lr': 0.01}}",
    "learning_rate": "the learning rate goes inside 'optimizer_args', e.g. {'optimizer_args': {'lr': 0.01}}",
    "seed": "the seed is 'random_seed' here",
    "gpu": "'use_gpu' asks for a GPU here",
    "num_epochs": "'epochs' here",
    "n_epochs": "'epochs' here",
    "loader_arguments": "'loader_args' here",
    "optimizer_arguments": "'optimizer_args' here",
    "test_batch_size": "the test loader uses the training batch size here",
    "test_metric": "not supported: override testing_step(data, target) in the plan to return your metrics",
    "test_metric_args": "not supported: override testing_step(data, target) in the plan to return your metrics",
    "shuffle_testing_dataset": "not supported: the test split is fixed by 'random_seed' so rounds stay comparable",
    "fedprox_mu": "FedProx is not supported: add the proximal term in the plan's training_step",
    "share_persistent_buffers": "not needed: the whole state_dict (buffers included) travels every round",
}


class TrainingArgs(BaseModel):
    """What a researcher may ask of a round. `num_updates`, when set, wins over `epochs`.

        TrainingArgs.parse({"epochs": 2, "optimizer_args": {"lr": 1e-3}, "loader_args": {"batch_size": 48}})

    Batch size and loader arguments, one rule: a key set in two places must agree, else it is an
    error naming both; nothing a researcher set is replaced without a report.
    - `batch_size` and Fed-BioMed's `loader_args={"batch_size": n}` are two spellings of one setting:
      the latter is moved to `batch_size` at validation (both given and different: error).
    - The plan's `training_data(batch_size)` receives `batch_size` (or 32 when unset), and the
      DataManager's own keyword arguments are honoured; `loader_args` add the keys it does not set.
      A key the DataManager sets to a different value than `batch_size`/`loader_args` ask is an
      error at the round (TRAINING_ARGS_INVALID), never a silent override either way.
    - Neither sets a batch size: 32 (`DEFAULT_BATCH_SIZE`).
    - Last, the node's caps (`[limits] max_batch_size`, ...) lower the result; each change is
      reported in the reply's `applied_caps` as {"requested", "applied"}.

    `dp_args`: None, or {"sigma": noise multiplier > 0, "clip": max grad norm > 0,
    optional "delta" (default 1e-5) used to report epsilon, optional "type": "local"}.

    Evaluation (Fed-BioMed's names), on the held-out `test_ratio` of the node's data with the plan's
    `testing_step`: `test_on_global_updates` tests the received global model before local training (reply
    metrics `global_<name>`), `test_on_local_updates` (default on) tests the local update after it
    (`test_<name>`). Either needs a test split: `test_on_global_updates=True` with `test_ratio` 0 is refused;
    `test_on_local_updates` is simply idle then (it is on by default).
    """

    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(1, ge=1)
    num_updates: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=1)
    optimizer_args: dict[str, Any] = Field(default_factory=lambda: {"lr": 0.01})
    loader_args: dict[str, Any] = Field(default_factory=dict)
    test_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    test_on_local_updates: bool = True
    test_on_global_updates: bool = False
    log_interval: int = Field(10, ge=1)
    random_seed: int | None = None
    dry_run: bool = False
    use_gpu: bool = False
    dp_args: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _fold_loader_batch_size(cls, data: Any) -> Any:
        """Fed-BioMed's `loader_args.batch_size` becomes `batch_size`, so one value reaches the loader."""
        if not isinstance(data, dict) or not isinstance(data.get("loader_args"), dict):
            return data
        loader = dict(data["loader_args"])
        if "batch_size" not in loader:
            return data
        wanted = loader.pop("batch_size")
        given = data.get("batch_size")
        if given is not None and given != wanted:
            raise ValueError(
                f"'batch_size' ({given}) and 'loader_args.batch_size' ({wanted}) disagree; give the batch size once"
            )
        return {**data, "batch_size": wanted, "loader_args": loader}

    @model_validator(mode="after")
    def _global_tests_need_a_split(self) -> TrainingArgs:
        if self.test_on_global_updates and self.test_ratio == 0:
            raise ValueError("'test_on_global_updates' needs a test split: set 'test_ratio' > 0 (e.g. 0.2)")
        return self

    @property
    def tests_global(self) -> bool:
        """The node tests the received global model before training (needs a test split)."""
        return self.test_on_global_updates and self.test_ratio > 0

    @property
    def tests_local(self) -> bool:
        """The node tests its local update after training (today's behaviour whenever `test_ratio` > 0)."""
        return self.test_on_local_updates and self.test_ratio > 0

    def loader_request(self) -> dict[str, Any]:
        """What the researcher asked of the data loader: `loader_args`, plus `batch_size` when set."""
        asked = dict(self.loader_args)
        if self.batch_size is not None:
            asked["batch_size"] = self.batch_size
        return asked

    @field_validator("optimizer_args")
    @classmethod
    def _lr_positive(cls, v: dict[str, Any]) -> dict[str, Any]:
        lr = v.get("lr")
        if lr is not None and (not isinstance(lr, int | float) or isinstance(lr, bool) or lr <= 0):
            raise ValueError("'lr' must be a number > 0")
        return v

    @field_validator("loader_args")
    @classmethod
    def _loader_args(cls, v: dict[str, Any]) -> dict[str, Any]:
        # These would let plan data escape the framework's control (pickled workers, custom samplers).
        forbidden = {"dataset", "sampler", "batch_sampler", "collate_fn", "worker_init_fn"} & v.keys()
        if forbidden:
            raise ValueError(f"keys not allowed in loader_args: {sorted(forbidden)}")
        return v

    @field_validator("dp_args")
    @classmethod
    def _dp(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return None
        unknown = v.keys() - _DP_KEYS
        if unknown:
            raise ValueError(f"unknown dp_args keys {sorted(unknown)}; allowed: {sorted(_DP_KEYS)}")
        out: dict[str, Any] = {"type": v.get("type", "local"), "delta": float(v.get("delta", 1e-5))}
        if out["type"] != "local":
            raise ValueError("only local DP (type 'local') is supported")
        for key in ("sigma", "clip"):
            val = v.get(key)
            if not isinstance(val, int | float) or isinstance(val, bool) or val <= 0:
                raise ValueError(f"dp_args '{key}' must be a number > 0")
            out[key] = float(val)
        if not 0 < out["delta"] < 1:
            raise ValueError("dp_args 'delta' must be in (0, 1)")
        if "sample_rate" in v:
            if not isinstance(v["sample_rate"], int | float) or not 0 < v["sample_rate"] <= 1:
                raise ValueError("dp_args 'sample_rate' must be in (0, 1]")
            out["sample_rate"] = float(v["sample_rate"])
        if "max_steps" in v:
            if type(v["max_steps"]) is not int or v["max_steps"] < 1:
                raise ValueError("dp_args 'max_steps' must be an integer >= 1")
            out["max_steps"] = v["max_steps"]
        return out

    @classmethod
    def parse(cls, data: dict[str, Any] | TrainingArgs | None) -> TrainingArgs:
        """Validate a dict; errors become `TrainingArgsError` naming each offending key."""
        if isinstance(data, TrainingArgs):
            return data
        try:
            return cls.model_validate(data or {})
        except ValidationError as exc:
            parts = []
            for err in exc.errors():
                loc = err.get("loc", ())
                msg = err["msg"].removeprefix("Value error, ")
                if err["type"] == "extra_forbidden" and len(loc) == 1:
                    parts.append(unknown_key_message(str(loc[0])))
                elif loc:
                    parts.append(f"training_args '{'.'.join(str(p) for p in loc)}': {msg}")
                else:
                    parts.append(f"training_args: {msg}")
            raise TrainingArgsError("; ".join(parts)) from None


def unknown_key_message(key: str) -> str:
    """Why `key` is refused: the Fed-BioMed alias or the nearest allowed key, then every allowed key."""
    allowed = sorted(TrainingArgs.model_fields)
    if key in FEDBIOMED_ALIASES:
        hint = FEDBIOMED_ALIASES[key]
    else:
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f"did you mean '{close[0]}'?" if close else "no allowed key is close"
    return f"training_args '{key}' is not a training argument ({hint}); allowed keys: {', '.join(allowed)}"
