"""A plan that defines its own loop is flagged to the reviewer: `fedsilo node plan show` and the GUI review page."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from fedsilo.common.plan_source import plan_hash
from fedsilo.gui.app import create_app
from fedsilo.gui.users import UserStore
from fedsilo.node.cli import node
from fedsilo.node.config import NodeConfig
from fedsilo.node.plans import PlanStore
from tests.support.plans import LOGREG_PLAN

CUSTOM = LOGREG_PLAN + '''
    def training_routine(self, loader, on_scalar=None):
        return {}
'''
FLAG = "overrides the training loop: node caps and DP cannot be enforced"


@pytest.fixture
def nodedir(tmp_path: Path) -> Path:
    d = tmp_path / "node"
    NodeConfig.create(d, {"node": {"name": "n1", "node_id": "n1"}}).save()
    store = PlanStore(d)
    for source in (LOGREG_PLAN, CUSTOM):
        store.submit(source, "HeartPlan", "researcher")
    return d


def _show(nodedir: Path, source: str) -> str:
    r = CliRunner().invoke(node, ["plan", "show", "--dir", str(nodedir), plan_hash(source)])
    assert r.exit_code == 0, r.output
    return r.output


def test_plan_show_flags_a_plan_with_its_own_loop(nodedir: Path) -> None:
    assert FLAG not in _show(nodedir, LOGREG_PLAN)
    shown = _show(nodedir, CUSTOM)
    assert f"warning:      defines training_routine: {FLAG}" in shown
    assert "refused unless [node] allow_custom_loop lists its sha256" in shown
    cfg = NodeConfig.load(nodedir)
    cfg.node.allow_custom_loop = [plan_hash(CUSTOM)]
    cfg.save()
    assert "this node allows it" in _show(nodedir, CUSTOM)


def test_review_page_flags_a_plan_with_its_own_loop(nodedir: Path) -> None:
    UserStore(nodedir).add("alice", "correct horse battery", "data_manager")
    app = create_app(nodedir)
    app.config["WTF_CSRF_ENABLED"] = False
    client = app.test_client()
    assert client.post("/login", data={"username": "alice", "password": "correct horse battery"}).status_code == 302
    page = client.get(f"/plans/{plan_hash(CUSTOM)}").get_data(as_text=True)
    assert 'id="custom-loop"' in page and FLAG in page and "defines training_routine" in page
    plain = client.get(f"/plans/{plan_hash(LOGREG_PLAN)}").get_data(as_text=True)
    assert 'id="custom-loop"' not in plain
