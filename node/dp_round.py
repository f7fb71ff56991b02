"""The daemon's privacy stages of a training round: the DP policy on the arguments, the budget charge before
the worker, and the charge marked spent before the update leaves the node.

    cap_args:      effective_dp(dp_args, cfg.dp, needed=needs_dp(r)) -> dp_args raised to the floors, or refused
    charge_budget: (rate, steps) = planned_round(rows, args, limits); ledger.charge(...) or BudgetExceeded
    spend_budget:  ledger.mark_spent(request_id)   (first of the stages after the worker)

Every training round under DP is charged, with a budget or without (the GUI then shows what was spent); only a
budget refuses. An evaluation trains nothing and is neither capped nor charged here.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from fedsilo.common.errors import ErrorCode
from fedsilo.common.training_args import TrainingArgs
from fedsilo.network.messages import TrainRequest

from .budget import Charge, PrivacyLedger
from .config import NodeConfig
from .dp_policy import DPRequestRefused, planned_round, weaker_fields
from .stages import stage

if TYPE_CHECKING:
    from .daemon_round import DaemonRound

log = logging.getLogger("fedsilo.node.privacy")


def ledger(cfg: NodeConfig) -> PrivacyLedger:
    """The node's privacy ledger under its `[dp]` policy."""
    return PrivacyLedger(cfg.dir, cfg.dp)


def needs_dp(r: DaemonRound) -> bool:
    """Whether the round's dataset has a budget (then it trains with DP whatever was asked)."""
    return isinstance(r.request, TrainRequest) and ledger(r.node.config).budget(r.request.dataset_id) is not None


def log_raised(r: DaemonRound) -> None:
    """A WARNING in the node log for a request the policy strengthened (the reply says it in `applied_caps`)."""
    cap = r.applied.get("dp_args")
    if cap is None:
        return
    notes = weaker_fields(cap["requested"] or {}, cap["applied"]) or ["no dp_args asked"]
    log.warning("[%s] dp_args of %s raised to the node's policy: %s", r.request.request_id, r.request.sender,
                ", ".join(notes))  # fmt: skip


@stage("privacy_budget", ErrorCode.INTERNAL)
def charge_budget(r: DaemonRound) -> None:
    """Charge the round to its dataset before any plan code sees the data (budget.py), and pin the sampling
    rate and steps it was charged for into its dp_args (the trainer runs exactly that, privacy.py)."""
    dp = r.args.dp_args if r.args is not None else None
    if not isinstance(r.request, TrainRequest) or dp is None:
        return
    assert r.args is not None
    cfg, req = r.node.config, r.request
    rows = r.record.get("shape", [None])[0] if r.record.get("shape") else None
    if type(rows) is not int:
        raise DPRequestRefused(f"dataset '{req.dataset_id}' has no sample count: the node cannot account DP on it")
    rate, steps = planned_round(rows, r.args, cfg.limits)
    entry = ledger(cfg).charge(Charge(req.request_id, req.dataset_id, req.sender, req.job_id, req.round,
                                      req.plan.sha256, dp["sigma"], dp["clip"], rate, steps))  # fmt: skip
    # What the researcher may have put in sample_rate/max_steps is replaced by what was charged; the round's
    # epsilon is reported at the budget's delta when that is smaller.
    final = {**dp, "delta": min(dp["delta"], entry["delta"]), "sample_rate": entry["sample_rate"],
             "max_steps": entry["steps"]}  # fmt: skip
    r.args = TrainingArgs.parse({**r.args.model_dump(), "dp_args": final})
    requested = req.training_args.dp_args
    r.applied["dp_args"] = {"requested": requested, "applied": final}
    r.applied["privacy_budget"] = {"requested": None, "applied": entry.get("budget"), "delta": entry["delta"],
                                   "epsilon": entry["epsilon"], "spent": entry["spent"],
                                   "remaining": entry.get("remaining")}  # fmt: skip
    log.info("[%s] charged epsilon %.4g to dataset %s for %s (spent %.4g%s)", req.request_id, entry["epsilon"],
             req.dataset_id, req.sender, entry["spent"],
             f" of {entry['budget']:g}" if entry.get("budget") is not None else "")  # fmt: skip


@stage("privacy_budget", ErrorCode.INTERNAL)
def spend_budget(r: DaemonRound) -> None:
    """The update is about to leave: its charge (counted since before the worker) is marked spent."""
    if isinstance(r.request, TrainRequest) and "privacy_budget" in r.applied:
        ledger(r.node.config).mark_spent(r.request.request_id)
