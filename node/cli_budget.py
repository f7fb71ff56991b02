"""`fedsilo node budget` and `fedsilo node dataset budget`: the epsilon each dataset may spend, and who spent it.

    fedsilo node dataset budget --dir NODE heart-2024 --epsilon 3 [--delta 1e-6]   # its own budget
    fedsilo node dataset budget --dir NODE heart-2024 --clear                      # back to [dp] epsilon_budget
    fedsilo node budget --dir NODE                                                 # budget, spent, who, per dataset

Reading the ledger needs no accountant run (each charge keeps the totals after it), so these answer in the
time of any other node command; only a budget whose delta changed recomputes with Opacus.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from fedsilo.common.clitools import friendly_errors, table

from .cli import _actor, dataset, dir_option, node


def _ledger(nodedir: Path) -> Any:
    from .budget import PrivacyLedger
    from .config import NodeConfig

    return PrivacyLedger(nodedir, NodeConfig.load(nodedir).dp)


def _eps(value: float | None) -> str | None:
    return None if value is None else f"{value:.4g}"


def spent_by(row: dict[str, Any]) -> str:
    """'r1: 0.8 (2 rounds); r2: 0.6 (1 round)' — the epsilon of each researcher's rounds alone."""
    return "; ".join(f"{who}: {_eps(v['epsilon'])} ({v['rounds']} round{'s' if v['rounds'] != 1 else ''})"
                     for who, v in row["by"].items())  # fmt: skip


@node.command("budget")
@dir_option
@friendly_errors
def budget_table(nodedir: Path) -> None:
    """Per dataset: its epsilon budget and delta, the epsilon spent (all rounds composed), what remains, and
    which researchers spent it."""
    from .datasets import DatasetStore

    names = {d["dataset_id"]: d["name"] for d in DatasetStore(nodedir).list()}
    rows = _ledger(nodedir).summary(names)
    click.echo(table(
        ["dataset", "name", "budget", "delta", "spent", "remaining", "rounds", "spent by"],
        [[r["dataset_id"], names.get(r["dataset_id"], "(removed)"), _eps(r["budget"]), f"{r['delta']:g}",
          _eps(r["spent"]), _eps(r["remaining"]), r["rounds"], spent_by(r) or None] for r in rows],
        max_width=80))  # fmt: skip


@dataset.command("budget")
@dir_option
@click.argument("id_or_name")
@click.option("--epsilon", type=float, default=None, help="Its epsilon budget (replaces [dp] epsilon_budget).")
@click.option("--delta", type=float, default=None, help="Its delta (default: [dp] delta).")
@click.option("--clear", is_flag=True, help="Remove the dataset's own budget: [dp] epsilon_budget applies again.")
@friendly_errors
def dataset_budget(nodedir: Path, id_or_name: str, epsilon: float | None, delta: float | None, clear: bool) -> None:
    """Set (or --clear) the epsilon budget of one dataset. Lowering it below what was spent refuses every
    later round on it; what was spent stays spent."""
    from .datasets import DatasetStore

    if clear == (epsilon is not None):
        raise click.UsageError("give either --epsilon E (and optionally --delta D) or --clear")
    dataset_id = DatasetStore(nodedir).get(id_or_name)["dataset_id"]
    ledger = _ledger(nodedir)
    if clear:
        removed = ledger.clear_budget(dataset_id, by=_actor())
        click.echo(f"{dataset_id}: " + ("its own budget removed" if removed else "had no budget of its own"))
    else:
        assert epsilon is not None
        ledger.set_budget(dataset_id, epsilon, by=_actor(), delta=delta)
    [row] = ledger.summary([dataset_id])[:1]
    budget = f"epsilon {row['budget']:g}, delta {row['delta']:g}" if row["budget"] is not None else "no budget"
    click.echo(f"{dataset_id}: {budget}; spent {row['spent']:.4g}")
