"""The node's data loading plans (`NODEDIR/db/loading_plans.json`): one per dataset, keyed by dataset id.

The CLI (`fedsilo node dataset dlp set|show|clear`), the GUI and the daemon go through this store. A plan
is validated once, when it is set: as a `DataLoadingPlan` and against the dataset's registered summary
(an alias must name one of its modalities, a rename one of its columns). Every change is written to the
AuditLog (`loading_plan_set`, `loading_plan_cleared`) with the acting person and the plan before and after.

    store = LoadingPlanStore(nodedir)
    store.set("ds_ab12", DataLoadingPlan(aliases={"T1": "T1w"}), by="cli:alice")
    store.get("ds_ab12")            # DataLoadingPlan, or None
    store.clear("ds_ab12", by="gui:bob")
    attach(record, nodedir)         # the record the worker gets: its plan under "loading_plan"
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tinydb import Query

from fedsilo.common.datasets.loading_plan import DataLoadingPlan

from ._db import LockedDB, now_iso
from .audit import AuditLog
from .config import node_paths
from .datasets import DatasetStore

SCHEMA_VERSION = 1


class LoadingPlanStore:
    """Get, set and clear the data loading plan of a dataset (by id or name).

        LoadingPlanStore(nodedir).set("prostate", {"aliases": {"T1": "T1w"}}, by="gui:alice")
    """

    TABLE = "loading_plans"

    def __init__(self, nodedir: str | Path) -> None:
        self.nodedir = node_paths(nodedir).root
        self._db = LockedDB(node_paths(nodedir).db / "loading_plans.json", "loading_plans", SCHEMA_VERSION)
        self.datasets = DatasetStore(nodedir)
        self.audit = AuditLog(nodedir)

    def get(self, dataset: str) -> DataLoadingPlan | None:
        """The dataset's plan, or None; `UnknownDataset` for no such dataset."""
        dataset_id = self.datasets.get(dataset)["dataset_id"]
        return self._get(dataset_id)

    def _get(self, dataset_id: str) -> DataLoadingPlan | None:
        if not self._db.path.is_file():
            return None
        with self._db.read() as db:
            row = db.table(self.TABLE).get(Query().dataset_id == dataset_id)
        return DataLoadingPlan.parse(row["plan"]) if row else None

    def set(self, dataset: str, plan: DataLoadingPlan | dict[str, Any], by: str = "cli") -> DataLoadingPlan:
        """Validate `plan` against the dataset and store it (an empty plan clears); `DataLoadingPlanError`
        names the entry that does not fit, and nothing is stored then."""
        record = self.datasets.get(dataset)
        dlp = plan if isinstance(plan, DataLoadingPlan) else DataLoadingPlan.parse(plan)
        assert dlp is not None
        if dlp.is_empty():
            self.clear(record["dataset_id"], by=by)
            return dlp
        dlp.check(record)
        previous = self._write(record["dataset_id"], dlp, by)
        self.audit.record("loading_plan_set", by, dataset_id=record["dataset_id"], name=record["name"],
                          plan=dlp.model_dump(), previous=previous)  # fmt: skip
        return dlp

    def clear(self, dataset: str, by: str = "cli") -> bool:
        """Remove the dataset's plan; False when it had none (nothing is audited then)."""
        record = self.datasets.get(dataset)
        previous = self._write(record["dataset_id"], None, by)
        if previous is None:
            return False
        self.audit.record("loading_plan_cleared", by, dataset_id=record["dataset_id"], name=record["name"],
                          previous=previous)  # fmt: skip
        return True

    def _write(self, dataset_id: str, plan: DataLoadingPlan | None, by: str) -> dict[str, Any] | None:
        """Replace the row; returns the plan it held (as stored), or None."""
        q = Query()
        with self._db.write() as db:
            table = db.table(self.TABLE)
            row = table.get(q.dataset_id == dataset_id)
            previous = dict(row["plan"]) if row else None
            table.remove(q.dataset_id == dataset_id)
            if plan is not None:
                table.insert({"dataset_id": dataset_id, "plan": plan.model_dump(), "set_by": by, "set_at": now_iso()})
        return previous


def attach(record: dict[str, Any], nodedir: str | Path) -> dict[str, Any]:
    """`record` with its data loading plan under `loading_plan` (absent when none): what the daemon hands
    the worker, whose `bind` applies it to the plan's dataset, and what `describe` shows served names from."""
    plan = LoadingPlanStore(nodedir)._get(record["dataset_id"])
    if plan is None:
        return record
    return {**record, "loading_plan": plan.model_dump()}
