"""Privacy budget: per dataset, the epsilon budget, the epsilon spent by all rounds composed, what remains and
which researchers spent it; the node's DP policy; the latest charges. Read-only: budgets are set with
`fedsilo node dataset budget` (node/cli_budget.py), the ledger is the daemon's (node/budget.py).

    GET /budget/    -> budget.html
"""

from __future__ import annotations

from flask import Blueprint, render_template

from fedsilo.node.budget import PrivacyLedger

from .app import ctx

bp = Blueprint("budget", __name__, url_prefix="/budget")

RECENT = 50
"""Charges listed under the table, newest first."""


@bp.route("/")
def index() -> str:
    c = ctx()
    names = {d["dataset_id"]: d["name"] for d in c.datasets.list()}
    ledger = PrivacyLedger(c.nodedir, c.config.dp)
    rows = ledger.summary(names)
    charges = list(reversed(ledger.charges()))[:RECENT]
    return render_template("budget.html", rows=rows, names=names, charges=charges, policy=c.config.dp, recent=RECENT,
                           nodedir=c.nodedir)  # fmt: skip
