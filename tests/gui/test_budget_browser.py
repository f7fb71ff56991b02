"""The privacy budget page under gunicorn (`fedsilo gui start`), driven by headless Chromium: per dataset the
budget, the epsilon spent (all rounds composed) and who spent it, read from the node's real ledger file."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from fedsilo.node.budget import Charge, PrivacyLedger
from fedsilo.node.config import NodeConfig
from fedsilo.node.datasets import DatasetStore
from tests.support.creds import offline_credentials
from tests.support.procs import FEDSILO

from .helpers import GuiServer, init_node, login, make_data, new_context, start_gui

pytestmark = pytest.mark.browser


def _charge(ledger: PrivacyLedger, rid: str, dataset: str, who: str, job: str) -> dict[str, Any]:
    return ledger.charge(Charge(rid, dataset, who, job, 0, "a" * 64, 2.0, 1.0, 0.05, 20))


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("budgetnode")
    data, _ = make_data(root)
    nodedir = root / "node"
    init_node(nodedir, "hospital1", offline_credentials(root / "creds.json", "hospital1"), data)
    store = DatasetStore(nodedir)
    heart = store.add("heart", ["cardio"], "csv", data / "cardio" / "heart.csv", added_by="test")["dataset_id"]
    small = store.add("heart-small", ["cardio"], "csv", data / "cardio" / "heart.csv", added_by="test")["dataset_id"]
    for dataset, epsilon in ((heart, "5"), (small, "0.7")):
        subprocess.run([*FEDSILO, "node", "dataset", "budget", "--dir", str(nodedir), dataset, "--epsilon", epsilon],
                       check=True, capture_output=True)  # fmt: skip
    ledger = PrivacyLedger(nodedir, NodeConfig.load(nodedir).dp)
    _charge(ledger, "q1", heart, "r1", "job-a")
    _charge(ledger, "q2", heart, "r2", "job-b")
    last = _charge(ledger, "q3", heart, "r1", "job-c")
    ledger.mark_spent("q1")
    _charge(ledger, "q4", small, "r2", "job-d")  # 0.60 of 0.7: the next would pass it
    return {"dir": nodedir, "heart": heart, "small": small, "ledger": ledger, "spent": last["spent"]}


@pytest.fixture(scope="module")
def page(browser, node: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Page]:
    server: GuiServer = start_gui(node["dir"], tmp_path_factory.mktemp("budgetgui") / "gui.log")
    context = new_context(browser, server.url)
    page = context.new_page()
    login(page, server.url, "vic")  # a viewer may read the budget
    yield page
    context.close()
    server.stop()


def test_the_budget_page_shows_per_dataset_budget_spent_and_who(page: Page, node: dict[str, Any],
                                                                screenshots: Path) -> None:  # fmt: skip
    page.get_by_role("link", name="Privacy budget").click()
    expect(page.get_by_role("heading", name="Privacy budget", exact=True)).to_be_visible()
    expect(page.get_by_role("link", name="Privacy budget")).to_have_attribute("aria-current", "page")
    [row] = node["ledger"].summary([node["heart"]])[:1]
    heart = page.locator(f'#budgets tr[data-dataset="{node["heart"]}"]')
    expect(heart.locator(".spent")).to_contain_text(f"{node['spent']:.4g}")
    expect(heart.locator(".remaining")).to_have_text(f"{5 - node['spent']:.4g}")
    expect(heart).to_contain_text("5, 1e-05 (this dataset)")
    expect(heart).to_contain_text(f"r1: epsilon {row['by']['r1']['epsilon']:.4g} in 2 rounds (job-a, job-c)")
    expect(heart).to_contain_text(f"r2: epsilon {row['by']['r2']['epsilon']:.4g} in 1 round (job-b)")
    expect(page.locator("#charges tbody tr")).to_have_count(4)
    expect(page.locator("#charges tbody tr").first).to_contain_text("counted, not sent")  # q4: newest, reserved
    page.screenshot(path=screenshots / "budget.png", full_page=True)


def test_a_dataset_whose_budget_was_lowered_below_its_spending_shows_exhausted(page: Page, node: dict[str, Any]):
    subprocess.run([*FEDSILO, "node", "dataset", "budget", "--dir", str(node["dir"]), node["small"],
                    "--epsilon", "0.5"], check=True, capture_output=True)  # fmt: skip
    page.goto("/budget/")
    small = page.locator(f'#budgets tr[data-dataset="{node["small"]}"]')
    expect(small.locator(".remaining")).to_have_text("exhausted")
    expect(small).to_contain_text("0.5, 1e-05 (this dataset)")
