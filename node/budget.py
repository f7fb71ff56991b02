"""The node's privacy ledger: epsilon spent per dataset, across every experiment and researcher, and its budget.

Each DP round is charged before its worker starts (`PrivacyLedger.charge`): who asked, which job and round,
the noise multiplier, the Poisson sampling rate and the steps the node allowed it (`dp_policy.planned_round`,
computed by the daemon from the capped arguments, never counted by the worker, which runs plan code). A
dataset's spent epsilon is the composition of all its charges as Opacus' RDP accountant composes a history: the
RDP of each charge (sampled Gaussian, at Opacus' orders) adds up, and the sum converts to epsilon at the budget's
delta. The accountant's state kept here is that sum, per dataset and per (dataset, researcher), in the `totals`
table. A charge that would take the dataset past its budget raises `BudgetExceeded` with the remaining budget,
and nothing is recorded.

Crashes: the charge is written (atomically, under the store's file lock, in `db/privacy.json`) before any plan
code sees the data and stays counted whatever happens next: a round that fails or dies in its worker, or whose
daemon is killed, keeps its charge ("reserved"; "spent" once its update is about to leave the node). The same
request run again after a restart (the durable queue re-runs it) reuses its charge: only one of the two runs
can release anything, since a killed run's reply never left the node.

    ledger = PrivacyLedger(nodedir, cfg.dp)
    ledger.set_budget(dataset_id, epsilon=3.0, by="cli:alice")
    entry = ledger.charge(Charge(request_id, dataset_id, "r1", "job", 0, plan_sha, 1.1, 1.0, 0.125, 16))
    ledger.summary([dataset_id])      # budget, spent, remaining and who spent it, per dataset
"""

from __future__ import annotations

import functools
import importlib.util
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from tinydb import Query

from fedsilo.common.errors import FedsiloError

from ._db import LockedDB, now_iso
from .audit import AuditLog
from .config import DPPolicy, node_paths

SCHEMA_VERSION = 1
STATUSES = ("reserved", "spent")
"""A charge is "reserved" from before the worker starts, "spent" once the update is about to leave; both count
against the budget (a charge is never given back)."""


class BudgetExceeded(FedsiloError):
    """A round would take a dataset past its epsilon budget; the message gives the remaining budget."""


@dataclass(frozen=True)
class Budget:
    """A dataset's budget: (epsilon, delta), from its own override (`source="dataset"`) or `[dp]`."""

    epsilon: float
    delta: float
    source: str


@dataclass(frozen=True)
class Charge:
    """What a DP round is charged for, before it runs."""

    request_id: str
    dataset_id: str
    researcher: str
    job_id: str
    round: int
    plan_sha256: str
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int


def rdp_curve(noise_multiplier: float, sample_rate: float, steps: int) -> list[float]:
    """The RDP of `steps` steps of the sampled Gaussian mechanism at each order of `ALPHAS` (Opacus' analysis)."""
    analysis = _rdp_analysis()
    return [float(v) for v in analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=steps,
                                                   orders=ALPHAS)]  # fmt: skip


def epsilon_of(curve: list[float] | None, delta: float) -> float:
    """Epsilon at `delta` of an RDP curve (a sum of charges' curves; None or all zeros = nothing spent)."""
    if not curve or not any(curve):
        return 0.0
    epsilon, _ = _rdp_analysis().get_privacy_spent(orders=ALPHAS, rdp=np.asarray(curve), delta=delta)
    return float(epsilon)


def compose(charges: Iterable[dict[str, Any]], delta: float) -> float:
    """Epsilon of all `charges` together at `delta`, as Opacus' RDPAccountant composes a history: RDP adds up
    over the charges at every order, then the best order converts it to (epsilon, delta)."""
    curves = [rdp_curve(float(c["noise_multiplier"]), float(c["sample_rate"]), int(c["steps"])) for c in charges]
    return epsilon_of(_add(*curves), delta)


def _add(*curves: list[float] | None) -> list[float] | None:
    present = [np.asarray(c) for c in curves if c]
    return [float(v) for v in np.sum(present, axis=0)] if present else None


ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
"""The RDP orders Opacus' `RDPAccountant` searches (its DEFAULT_ALPHAS; the unit tests compare with it)."""


@functools.cache
def _rdp_analysis() -> ModuleType:
    """`opacus.accountants.analysis.rdp` (numpy and scipy only), loaded from its file: `import opacus` also loads
    its grad samplers, torch.func and more. Measured on the shared 2-core machine under load 10: 30 s for
    `import opacus`, 2 s for numpy and scipy.special, and the daemon pays it at its first DP round."""
    spec = importlib.util.find_spec("opacus")  # finds the package without importing it
    assert spec is not None and spec.origin is not None, "opacus is not installed"
    path = Path(spec.origin).parent / "accountants" / "analysis" / "rdp.py"
    module_spec = importlib.util.spec_from_file_location("fedsilo_opacus_rdp_analysis", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


class PrivacyLedger:
    """Budgets and charges of one node (`db/privacy.json`); the CLI, the daemon and the GUI share it."""

    def __init__(self, nodedir: str | Path, policy: DPPolicy) -> None:
        self.policy = policy
        self._db = LockedDB(node_paths(nodedir).db / "privacy.json", "privacy", SCHEMA_VERSION)
        self._audit = AuditLog(nodedir)

    # -------------------------------------------------------------------------------------------- budgets
    def budget(self, dataset_id: str) -> Budget | None:
        """The dataset's budget, or None when neither it nor `[dp] epsilon_budget` sets one."""
        with self._db.read() as db:
            return self._budget(db, dataset_id)

    def _budget(self, db: Any, dataset_id: str) -> Budget | None:
        own = db.table("budgets").get(Query().dataset_id == dataset_id)
        if own is not None:
            return Budget(float(own["epsilon"]), float(own.get("delta") or self.policy.delta), "dataset")
        if self.policy.epsilon_budget is not None:
            return Budget(self.policy.epsilon_budget, self.policy.delta, "node")
        return None

    def set_budget(self, dataset_id: str, epsilon: float, by: str, delta: float | None = None) -> dict[str, Any]:
        """The dataset's own budget (replacing `[dp] epsilon_budget` for it). Lowering it below what was spent
        refuses every later round; what was spent stays spent."""
        if not epsilon > 0 or (delta is not None and not 0 < delta < 1):
            raise ValueError("a budget needs epsilon > 0 and, when given, delta in (0, 1)")
        record = {"dataset_id": dataset_id, "epsilon": float(epsilon), "delta": delta, "set_by": by,
                  "set_at": now_iso()}  # fmt: skip
        with self._db.write() as db:
            db.table("budgets").upsert(record, Query().dataset_id == dataset_id)
        self._audit.record("privacy_budget_set", by, dataset_id=dataset_id, epsilon=float(epsilon), delta=delta)
        return record

    def clear_budget(self, dataset_id: str, by: str) -> bool:
        """Back to `[dp] epsilon_budget` for this dataset; False when it had no budget of its own."""
        with self._db.write() as db:
            removed = bool(db.table("budgets").remove(Query().dataset_id == dataset_id))
        if removed:
            self._audit.record("privacy_budget_cleared", by, dataset_id=dataset_id)
        return removed

    # -------------------------------------------------------------------------------------------- charges
    def charge(self, charge: Charge) -> dict[str, Any]:
        """Record `charge` if the dataset's budget allows it, else raise `BudgetExceeded`; the entry, with
        `epsilon` (the round alone), `spent` (the dataset's total after it) and `budget`/`remaining` when the
        dataset has one. Check and write happen under one lock: two rounds cannot both take the last of it."""
        with self._db.write() as db:
            table = db.table("charges")
            known = table.get(Query().request_id == charge.request_id)
            if known is not None:  # the same request re-run after a restart: charged once
                return dict(known)
            budget = self._budget(db, charge.dataset_id)
            delta = budget.delta if budget is not None else self.policy.delta
            # The accountant's state: the RDP curve of the dataset's charges so far, and of each researcher's
            # (RDP adds up, and converts to epsilon at any delta). Measured on the shared 2-core machine under load
            # 13: an RDP curve takes 96 ms, so recomputing every earlier charge made the 60th charge take 1 s.
            totals = db.table("totals")
            ds_key, who_key = f"dataset:{charge.dataset_id}", f"researcher:{charge.dataset_id}:{charge.researcher}"
            before = (totals.get(Query().key == ds_key) or {}).get("rdp")
            before_who = (totals.get(Query().key == who_key) or {}).get("rdp")
            curve = rdp_curve(charge.noise_multiplier, charge.sample_rate, charge.steps)
            spent_before, after = epsilon_of(before, delta), _add(before, curve)
            spent = epsilon_of(after, delta)
            if budget is not None and spent > budget.epsilon:
                remaining = max(budget.epsilon - spent_before, 0.0)
                raise BudgetExceeded(
                    f"dataset '{charge.dataset_id}' has {remaining:.4g} epsilon left of its budget of "
                    f"{budget.epsilon:g} (delta {delta:g}; {spent_before:.4g} spent); this round "
                    f"({charge.steps} steps at sample rate {charge.sample_rate:.4g}, noise multiplier "
                    f"{charge.noise_multiplier:g}) would bring it to {spent:.4g}"
                )
            after_who = _add(before_who, curve)
            entry = {**asdict(charge), "delta": delta, "status": "reserved", "at": now_iso(),
                     "epsilon": epsilon_of(curve, delta), "spent": spent,
                     "researcher_spent": epsilon_of(after_who, delta)}  # fmt: skip
            if budget is not None:
                entry["budget"], entry["remaining"] = budget.epsilon, budget.epsilon - spent
            totals.upsert({"key": ds_key, "rdp": after}, Query().key == ds_key)
            totals.upsert({"key": who_key, "rdp": after_who}, Query().key == who_key)
            table.insert(entry)
            return entry

    def mark_spent(self, request_id: str) -> None:
        """The round's update is about to leave the node (its charge counted already; this only says so)."""
        with self._db.write() as db:
            db.table("charges").update({"status": "spent", "spent_at": now_iso()}, Query().request_id == request_id)

    def charges(self, dataset_id: str | None = None) -> list[dict[str, Any]]:
        """Charges oldest first, of one dataset or all."""
        with self._db.read() as db:
            rows = [dict(r) for r in db.table("charges").all()]
        rows = [r for r in rows if dataset_id is None or r["dataset_id"] == dataset_id]
        return sorted(rows, key=lambda r: r["at"])

    # -------------------------------------------------------------------------------------------- reports
    def summary(self, dataset_ids: Iterable[str]) -> list[dict[str, Any]]:
        """Per dataset (those given, then any other with charges or a budget): budget, delta, where the budget
        comes from, spent, remaining, rounds, and `by` = per researcher {rounds, jobs, epsilon of their rounds
        alone}. Totals come from the last charge while its delta is still the budget's (no accountant run: a CLI
        table stays as quick as any other node command), else from the kept RDP curves."""
        with self._db.read() as db:
            charges = sorted((dict(r) for r in db.table("charges").all()), key=lambda c: c["at"])
            curves = {t["key"]: t["rdp"] for t in db.table("totals").all()}
            ids = list(dict.fromkeys([*dataset_ids, *(c["dataset_id"] for c in charges),
                                      *(b["dataset_id"] for b in db.table("budgets").all())]))  # fmt: skip
            budgets = {i: self._budget(db, i) for i in ids}
        rows = []
        for ds in ids:
            mine = [c for c in charges if c["dataset_id"] == ds]
            budget = budgets[ds]
            delta = budget.delta if budget is not None else self.policy.delta
            spent = _total(mine, "spent", curves.get(f"dataset:{ds}"), delta)
            groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
            for c in mine:
                groups[c["researcher"]].append(c)
            by = {who: {"rounds": len(theirs), "jobs": sorted({c["job_id"] for c in theirs}),
                        "epsilon": _total(theirs, "researcher_spent", curves.get(f"researcher:{ds}:{who}"), delta)}
                  for who, theirs in sorted(groups.items())}  # fmt: skip
            rows.append({
                "dataset_id": ds,
                "budget": budget.epsilon if budget else None,
                "delta": delta,
                "source": budget.source if budget else None,
                "spent": spent,
                "remaining": budget.epsilon - spent if budget else None,
                "rounds": len(mine),
                "by": by,
            })
        return rows


def _total(charges: list[dict[str, Any]], key: str, curve: list[float] | None, delta: float) -> float:
    """The total after the last of `charges` (time order) as it recorded it, or from `curve` at another delta."""
    if not charges:
        return 0.0
    last = charges[-1]
    return float(last[key]) if last["delta"] == delta else epsilon_of(curve, delta)
