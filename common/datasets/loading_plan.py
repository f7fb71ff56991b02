"""Data loading plans: how a node presents its local data in the consortium's common form, files untouched.

A node whose MR folders say `T1` while the consortium's plan asks for `T1w` sets an alias; a node whose
table says `Age` renames it `age`; a node coding the gland as 2 maps it to 1. The plan is typed and
validated once, when the data manager sets it (`check(record)` against what was found at registration),
stored next to the dataset (`fedsilo.node.loading_plans`), and applied in the training worker when the
plan's dataset is built (`bind`), so training plans are written once for every node.

    dlp = DataLoadingPlan(aliases={"T1": "T1w"}, renames={"Age": "age"}, label_map={"2": 1}, missing="drop")
    dlp.check(record)                       # DataLoadingPlanError naming what does not fit this dataset
    dlp.local_modality("T1w")               # 'T1': the folder the node reads
    dlp.model_dump()                        # JSON kept with the dataset

Fed-BioMed calls this a DataLoadingPlan too (there a dict of loading blocks); fedsilo keeps one flat,
typed record per dataset, because the four customisations above are what nodes of a consortium need.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedsilo.common.errors import FedsiloError

MISSING_POLICIES = ("drop", "refuse", "keep")
"""For a subject without a requested modality or demographics row (a table row with an empty cell):
`drop` leaves it out (counted; the node's log names it), `refuse` fails the round naming the count,
`keep` keeps it with NaN for the missing values (a missing image cannot be kept: such subjects are dropped)."""
MAX_ENTRIES = 256
"""Entries per mapping: a consortium maps a few names; the bound keeps a hostile form from filling the store."""
_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"


class DataLoadingPlanError(FedsiloError):
    """A data loading plan is malformed or does not fit its dataset; the message names the entry."""


class DataLoadingPlan(BaseModel):
    """Node-side customisations of one dataset (see the module docstring).

    `aliases`: local modality folder -> name served to plans. `renames`: local column (a table's, or a
    medical folder's demographics) -> name served. `label_map`: local label value -> value served (keys
    are text, as in JSON; numbers for image masks). `missing`: None keeps the dataset's own policy.

        DataLoadingPlan(aliases={"T1": "T1w"}).local_modality("T1w")     # 'T1'
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    aliases: dict[str, str] = Field(default_factory=dict, max_length=MAX_ENTRIES)
    renames: dict[str, str] = Field(default_factory=dict, max_length=MAX_ENTRIES)
    label_map: dict[str, float | int | str] = Field(default_factory=dict, max_length=MAX_ENTRIES)
    missing: Literal["drop", "refuse", "keep"] | None = None

    @field_validator("aliases")
    @classmethod
    def _modality_names(cls, value: dict[str, str]) -> dict[str, str]:
        # Modality names become folder lookups and dictionary keys: no separators, no '..', no control bytes.
        for local, served in value.items():
            for name in (local, served):
                if not re.match(_NAME_PATTERN, name):
                    raise ValueError(f"modality name {name!r}: letters, digits, '_', '.', '-' only, 1 to 64")
        return value

    @field_validator("renames")
    @classmethod
    def _column_names(cls, value: dict[str, str]) -> dict[str, str]:
        for local, served in value.items():
            for name in (local, served):
                if not name.strip() or len(name) > 200 or any(ord(c) < 32 for c in name):
                    raise ValueError(f"column name {name!r}: 1 to 200 printable characters")
        return value

    @field_validator("label_map")
    @classmethod
    def _label_values(cls, value: dict[str, Any]) -> dict[str, Any]:
        for local, served in value.items():
            if not local.strip() or len(local) > 200:
                raise ValueError(f"label value {local!r}: 1 to 200 characters")
            if isinstance(served, float) and not math.isfinite(served):
                raise ValueError(f"label {local!r} maps to {served}; use a finite number")
            if isinstance(served, str) and (not served.strip() or len(served) > 200):
                raise ValueError(f"label {local!r} maps to {served!r}: 1 to 200 characters")
        return value

    @model_validator(mode="after")
    def _one_to_one(self) -> DataLoadingPlan:
        for what, mapping in (("aliases", self.aliases), ("renames", self.renames)):
            served = list(mapping.values())
            twice = sorted({s for s in served if served.count(s) > 1})
            if twice:
                raise ValueError(f"{what}: {', '.join(twice)} served for more than one local name")
        return self

    # ------------------------------------------------------------------ building
    @classmethod
    def parse(cls, data: Mapping[str, Any] | None) -> DataLoadingPlan | None:
        """A stored or submitted plan; None for none; `DataLoadingPlanError` naming the entry at fault."""
        if data is None:
            return None
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            raise DataLoadingPlanError(_first_error(exc)) from None

    def is_empty(self) -> bool:
        return not (self.aliases or self.renames or self.label_map or self.missing)

    def merged(self, **changes: Any) -> DataLoadingPlan:
        """This plan with some fields replaced, validated again."""
        return DataLoadingPlan.parse({**self.model_dump(), **changes})  # type: ignore[return-value]

    # ------------------------------------------------------------------ checks against a dataset
    def check(self, record: Mapping[str, Any]) -> None:
        """Refuse entries that name nothing in this dataset, or a served name that hides a local one."""
        summary = record.get("summary") or {}
        modalities = _names(summary.get("modalities"))
        columns = _names(summary.get("columns")) | _names((summary.get("demographics") or {}).get("columns"))
        if self.aliases:
            unknown = sorted(set(self.aliases) - modalities)
            if unknown:
                raise DataLoadingPlanError(f"aliases: no modality {', '.join(unknown)} in this dataset "
                                           f"(it has: {', '.join(sorted(modalities)) or 'none'})")  # fmt: skip
            hidden = sorted((set(self.aliases.values()) & modalities) - set(self.aliases))
            if hidden:
                raise DataLoadingPlanError(f"aliases: {', '.join(hidden)} is already a modality of this dataset; "
                                           "alias it too, or serve another name")  # fmt: skip
        if self.renames:
            unknown = sorted(set(self.renames) - columns)
            if unknown:
                raise DataLoadingPlanError(f"renames: no column {', '.join(unknown)} in this dataset "
                                           f"(it has: {', '.join(sorted(columns)) or 'none'})")  # fmt: skip
            hidden = sorted((set(self.renames.values()) & columns) - set(self.renames))
            if hidden:
                raise DataLoadingPlanError(f"renames: {', '.join(hidden)} is already a column of this dataset")
        if self.label_map and modalities:
            self.numeric_label_map()

    # ------------------------------------------------------------------ applying
    def local_modality(self, served: str) -> str:
        """The folder holding the modality a plan asks for by its consortium name."""
        for local, name in self.aliases.items():
            if name == served:
                return local
        return served if served not in self.aliases else ""

    def served_modality(self, local: str) -> str:
        return self.aliases.get(local, local)

    def served_column(self, local: str) -> str:
        return self.renames.get(local, local)

    def numeric_label_map(self) -> dict[float, float]:
        """The label map for image masks and numeric targets: every key and value a number."""
        out: dict[float, float] = {}
        for local, served in self.label_map.items():
            try:
                out[float(local)] = float(served)
            except (TypeError, ValueError):
                raise DataLoadingPlanError(f"label_map: {local!r} -> {served!r} is not number -> number, "
                                           "as image masks need") from None  # fmt: skip
        return out

    def map_labels(self, array: Any) -> Any:
        """A numpy array with every mapped value replaced (all at once: 1->2 and 2->1 swap)."""
        mapping = self.numeric_label_map()
        out = array.copy()
        for local, served in mapping.items():
            out[array == local] = served
        return out


def parse_pairs(items: Iterable[str], what: str) -> dict[str, str]:
    """`LOCAL=SERVED` texts (repeated CLI options, or a form's lines) as a mapping; `DataLoadingPlanError`
    naming `what` and the malformed item.

        parse_pairs(["T1=T1w", "T2 = T2w"], "alias")     # {"T1": "T1w", "T2": "T2w"}
    """
    out: dict[str, str] = {}
    for item in items:
        local, sep, served = item.partition("=")
        if not sep or not local.strip() or not served.strip():
            raise DataLoadingPlanError(f"{what}: {item.strip()!r}: write LOCAL=SERVED")
        out[local.strip()] = served.strip()
    return out


def label_value(text: str) -> int | float | str:
    """A served label as typed text says: an int, else a float, else the text ("1" -> 1, "0.5" -> 0.5)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def bind(dataset: Any, record: Mapping[str, Any]) -> None:
    """Give a plan's dataset what the node knows about it: the registered options (Fed-BioMed's
    `set_dataset_parameters`) and the node's loading plan (`set_dlp`). The training worker calls this on
    the dataset of the plan's DataManager; datasets without these methods are left as they are."""
    setter = getattr(dataset, "set_dataset_parameters", None)
    if callable(setter):
        setter(dict(record.get("options") or {}))
    dlp = DataLoadingPlan.parse(record.get("loading_plan"))
    set_dlp = getattr(dataset, "set_dlp", None)
    if dlp is not None and callable(set_dlp):
        set_dlp(dlp)


def _names(value: Any) -> set[str]:
    if isinstance(value, Mapping):
        return {str(k) for k in value}
    if isinstance(value, list | tuple):
        return {str(v) for v in value}
    return set()


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    message = str(err["msg"]).removeprefix("Value error, ")
    return f"data loading plan: {where}: {message}" if where else f"data loading plan: {message}"
