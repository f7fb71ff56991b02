"""The node's DP policy and privacy ledger: floors raised or refused, the round's bound, epsilon composed per
dataset by Opacus' RDP accountant, budgets refused with the remaining epsilon, charges under a lock."""

from __future__ import annotations

import multiprocessing
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from opacus.accountants import RDPAccountant
from torch import nn
from torch.utils.data import TensorDataset

from fedsilo.common.errors import ConfigError
from fedsilo.common.training_args import TrainingArgs
from fedsilo.common.training_plan import DataManager, TorchTrainingPlan
from fedsilo.node.audit import AuditLog
from fedsilo.node.budget import BudgetExceeded, Charge, PrivacyLedger, compose
from fedsilo.node.cli import node
from fedsilo.node.config import DPPolicy, Limits, NodeConfig
from fedsilo.node.datasets import DatasetStore
from fedsilo.node.dp_policy import DPRequestRefused, effective_dp, planned_round
from fedsilo.node.privacy import PrivacyViolation
from fedsilo.node.trainer import Trainer
from tests.support.creds import offline_credentials

FLOOR = DPPolicy(min_noise_multiplier=1.0, max_grad_norm=1.0)
REFUSE = DPPolicy(min_noise_multiplier=1.0, max_grad_norm=1.0, weaker_request="refuse")


# ------------------------------------------------------------------------------------------------ policy
def test_a_weaker_request_is_raised_to_the_floor_and_a_stronger_one_kept():
    assert effective_dp({"sigma": 0.3, "clip": 5.0, "delta": 1e-3}, FLOOR) == {
        "type": "local", "sigma": 1.0, "clip": 1.0, "delta": 1e-5}  # fmt: skip
    strong = effective_dp({"sigma": 2.0, "clip": 0.5, "delta": 1e-7}, FLOOR)
    assert (strong["sigma"], strong["clip"], strong["delta"]) == (2.0, 0.5, 1e-7)
    assert effective_dp(None, FLOOR) is None  # nothing asked, nothing required, no budget: no DP


def test_refuse_mode_refuses_a_weaker_request_naming_what_to_ask():
    with pytest.raises(DPRequestRefused, match=r"sigma 0.5 < 1.*sigma >= 1, clip <= 1"):
        effective_dp({"sigma": 0.5, "clip": 1.0}, REFUSE)
    with pytest.raises(DPRequestRefused, match="clip 3 > 1"):
        effective_dp({"sigma": 1.0, "clip": 3.0}, REFUSE)
    # delta adds no noise: a researcher who left it at 1e-5 is not refused by a node at 1e-6, it is lowered
    ok = effective_dp({"sigma": 1.0, "clip": 1.0, "delta": 1e-5}, REFUSE.model_copy(update={"delta": 1e-6}))
    assert ok["delta"] == 1e-6


def test_no_request_where_dp_is_needed_gets_the_policy_or_a_refusal():
    assert effective_dp(None, FLOOR, needed=True)["sigma"] == 1.0
    with pytest.raises(DPRequestRefused, match="only with differential privacy"):
        effective_dp(None, REFUSE, needed=True)
    with pytest.raises(DPRequestRefused, match="privacy budget"):  # a budget but no floor to apply
        effective_dp(None, DPPolicy(), needed=True)


def test_config_reads_the_old_names_and_refuses_a_bad_mode(tmp_path: Path):
    node = {"name": "a", "node_id": "a"}
    cfg = NodeConfig.create(tmp_path, {"node": node, "dp": {"required": True, "sigma": 2.0, "clip": 0.5}})
    assert (cfg.dp.min_noise_multiplier, cfg.dp.max_grad_norm) == (2.0, 0.5)
    assert NodeConfig.create(tmp_path, cfg.model_dump(mode="json")).dp == cfg.dp  # what `save` writes reads back
    with pytest.raises(ConfigError, match="weaker_request"):
        NodeConfig.create(tmp_path, {"node": node, "dp": {"weaker_request": "ignore"}})
    with pytest.raises(ConfigError, match="min_noise_multiplier"):
        NodeConfig.create(tmp_path, {"node": node, "dp": {"required": True}})


def test_the_planned_round_follows_the_trainers_limits():
    args = TrainingArgs.parse({"epochs": 3, "batch_size": 10, "test_ratio": 0.2})
    assert planned_round(100, args, Limits()) == (1 / 8, 24)  # 80 training rows: 8 batches, 3 epochs
    assert planned_round(100, args, Limits(max_batch_size=5)) == (1 / 16, 48)
    assert planned_round(100, args, Limits(max_num_updates=5)) == (1 / 8, 5)
    assert planned_round(100, TrainingArgs.parse({"num_updates": 7}), Limits()) == (1 / 4, 7)  # default batch 32
    with pytest.raises(DPRequestRefused, match="no training samples"):
        planned_round(1, TrainingArgs.parse({"test_ratio": 0.9}), Limits())


# ------------------------------------------------------------------------------- the trainer runs the bound
class Plan(TorchTrainingPlan):
    rows = 48

    def init_model(self, model_args):
        return nn.Linear(4, 2)

    def training_data(self, batch_size):
        x = torch.randn(self.rows, 4, generator=torch.Generator().manual_seed(0))
        return DataManager(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=64)  # its own batch size


def _train(rows: int, args: dict, charged: tuple[float, int] | None = None):
    """Train as the worker does, with the dp_args the daemon hands over (`charged` overrides its bound)."""
    torch.manual_seed(0)
    cls = type("P", (Plan,), {"rows": rows, "training_step": lambda self, d, t: nn.functional.cross_entropy(
        self.model()(d), t)})  # fmt: skip
    plan = cls()
    ta = TrainingArgs.parse(args)
    rate, steps = charged or planned_round(rows, ta, Limits())
    ta = TrainingArgs.parse({**args, "dp_args": {**args["dp_args"], "sample_rate": rate, "max_steps": steps}})
    plan.post_init({}, ta)
    loader = plan.data_manager().loader()
    return Trainer(plan, ta, Limits(), DPPolicy()).train(loader, plan.get_parameters()), rate, steps


@pytest.mark.parametrize("rows, batch", [(48, 8), (93 * 32, 32)], ids=["6-batches", "93-batches"])
def test_the_trainer_spends_exactly_what_the_ledger_charges_by_opacus_own_accountant(rows: int, batch: int):
    """The trainer's own PrivacyEngine counts each private step (its optimizer hook); the ledger composes the
    charge. 93 batches: Opacus' sampler would take int(1 / (1 / 93)) = 92 steps and record rate 1/92."""
    dp = {"sigma": 1.1, "clip": 1.0, "delta": 1e-5}
    result, rate, steps = _train(rows, {"epochs": 2, "batch_size": batch, "dp_args": dp})
    assert result.steps == steps == 2 * (rows // batch)  # the plan's DataManager asked 64: the node's rate ran
    charge = {"noise_multiplier": 1.1, "sample_rate": rate, "steps": steps}
    assert compose([charge], 1e-5) == pytest.approx(result.epsilon, rel=1e-12)


def test_a_round_taking_more_steps_than_charged_fails():
    dp = {"sigma": 1.1, "clip": 1.0, "delta": 1e-5}
    with pytest.raises(PrivacyViolation, match="accounted for 1"):
        _train(48, {"epochs": 1, "batch_size": 8, "dp_args": dp}, charged=(1 / 6, 1))


# ------------------------------------------------------------------------------------------------- ledger
def _charge(rid: str, who: str = "r1", ds: str = "ds", sigma: float = 2.0, rate: float = 0.05, steps: int = 20):
    """A round of epsilon 0.60 at delta 1e-5 alone; 0.80 for two, 0.96 for three, 1.10 for four."""
    return Charge(rid, ds, who, f"job-{who}", 0, "a" * 64, sigma, 1.0, rate, steps)


def test_composition_equals_opacus_accountant_stepped_round_by_round():
    rounds = [(1.0, 0.1, 50), (1.5, 0.05, 200), (1.0, 0.1, 30)]
    accountant = RDPAccountant()
    for sigma, rate, steps in rounds:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=rate)
    charges = [{"noise_multiplier": s, "sample_rate": q, "steps": n} for s, q, n in rounds]
    assert compose(charges, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    alone = sum(compose([c], 1e-5) for c in charges)
    assert compose(charges, 1e-5) < alone  # RDP composes tighter than adding the rounds' epsilons


def test_a_budget_refuses_the_round_that_would_pass_it_with_the_remaining_budget(tmp_path: Path):
    ledger = PrivacyLedger(tmp_path, DPPolicy(epsilon_budget=1.0))
    first = ledger.charge(_charge("q1"))
    assert 0 < first["epsilon"] < 1.0 and first["remaining"] == pytest.approx(1.0 - first["spent"])
    with pytest.raises(BudgetExceeded) as info:
        ledger.charge(_charge("q2", sigma=0.6, steps=500))
    remaining = 1.0 - first["spent"]
    assert f"has {remaining:.4g} epsilon left of its budget of 1" in str(info.value)
    assert [c["request_id"] for c in ledger.charges()] == ["q1"]  # nothing recorded for the refused round


def test_a_re_run_request_is_charged_once_and_a_dataset_budget_overrides_the_node(tmp_path: Path):
    ledger = PrivacyLedger(tmp_path, DPPolicy(epsilon_budget=100.0))
    a = ledger.charge(_charge("q1"))
    assert ledger.charge(_charge("q1")) == a and len(ledger.charges()) == 1
    ledger.set_budget("ds", 0.5, by="cli:dm", delta=1e-6)
    assert ledger.budget("ds").source == "dataset" and ledger.budget("other").epsilon == 100.0
    with pytest.raises(BudgetExceeded, match=r"has 0 epsilon left of its budget of 0.5 \(delta 1e-06"):
        ledger.charge(_charge("q2"))
    assert ledger.clear_budget("ds", by="cli:dm") and ledger.budget("ds").source == "node"


def test_two_researchers_share_a_dataset_and_the_summary_says_who_spent_what(tmp_path: Path):
    ledger = PrivacyLedger(tmp_path, DPPolicy(epsilon_budget=10.0))
    ledger.charge(_charge("q1", "r1"))
    ledger.charge(_charge("q2", "r2"))
    last = ledger.charge(_charge("q3", "r1"))
    ledger.mark_spent("q1")
    [row] = ledger.summary(["ds"])
    assert row["spent"] == last["spent"] == pytest.approx(compose(ledger.charges("ds"), 1e-5))
    assert row["rounds"] == 3 and row["remaining"] == pytest.approx(10.0 - row["spent"])
    assert row["by"]["r1"]["rounds"] == 2 and row["by"]["r2"]["jobs"] == ["job-r2"]
    assert row["by"]["r1"]["epsilon"] == pytest.approx(compose(ledger.charges("ds")[::2], 1e-5))
    assert {c["status"] for c in ledger.charges()} == {"spent", "reserved"}  # both count


def _charge_in_process(nodedir: str, rid: str, out: multiprocessing.Queue) -> None:
    try:
        PrivacyLedger(nodedir, DPPolicy(epsilon_budget=1.1)).charge(_charge(rid))
        out.put("ok")
    except BudgetExceeded:
        out.put("refused")


def test_concurrent_rounds_cannot_both_take_the_last_of_a_budget(tmp_path: Path):
    """Eight processes charge at once: exactly as many rounds are admitted as fit, in whatever order."""
    fit = 0
    while compose([{"noise_multiplier": 2.0, "sample_rate": 0.05, "steps": 20}] * (fit + 1), 1e-5) <= 1.1:
        fit += 1
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_charge_in_process, args=(str(tmp_path), f"q{i}", out)) for i in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    answers = sorted(out.get(timeout=5) for _ in procs)
    assert 0 < fit < 8 and answers.count("ok") == fit and answers.count("refused") == 8 - fit
    assert len(PrivacyLedger(tmp_path, DPPolicy()).charges()) == fit


# ---------------------------------------------------------------------------------------------------- CLI
def test_the_budget_commands_set_show_and_clear_a_dataset_budget_and_refuse_nonsense(tmp_path: Path):
    runner = CliRunner()
    nodedir = tmp_path / "node"
    creds = offline_credentials(tmp_path / "n1.json", "n1")
    assert runner.invoke(node, ["init", "--dir", str(nodedir), "--name", "n1", "--network", str(creds)]).exit_code == 0
    (tmp_path / "t.csv").write_text("a,label\n" + "".join(f"{i},{i % 2}\n" for i in range(20)))
    ds = DatasetStore(nodedir).add("t", ["t"], "csv", tmp_path / "t.csv", added_by="test")["dataset_id"]
    d = ["--dir", str(nodedir)]

    def cli(*args: str):
        return runner.invoke(node, [*args[:2], *d, *args[2:]])

    assert cli("dataset", "budget", "t").exit_code == 2  # neither --epsilon nor --clear
    assert cli("dataset", "budget", "t", "--epsilon", "1", "--clear").exit_code == 2
    bad = cli("dataset", "budget", "t", "--epsilon", "-1")
    assert bad.exit_code == 1 and "epsilon > 0" in bad.output and "Traceback" not in bad.output
    assert cli("dataset", "budget", "nope", "--epsilon", "1").exit_code == 1
    ok = cli("dataset", "budget", "t", "--epsilon", "2", "--delta", "1e-6")
    assert ok.exit_code == 0 and f"{ds}: epsilon 2, delta 1e-06; spent 0" in ok.output
    table = runner.invoke(node, ["budget", *d]).output
    assert re.search(rf"{ds}\s+t\s+2\s+1e-06\s+0\s+2\s+0", table), table
    cleared = cli("dataset", "budget", "t", "--clear").output
    assert cleared == f"{ds}: its own budget removed\n{ds}: no budget; spent 0\n"
    assert "had no budget of its own" in cli("dataset", "budget", "t", "--clear").output
    events = [(e["event"], e["details"].get("epsilon")) for e in AuditLog(nodedir).list() if "budget" in e["event"]]
    assert events == [("privacy_budget_set", 2.0), ("privacy_budget_cleared", None)]
