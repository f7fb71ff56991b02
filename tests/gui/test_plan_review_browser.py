"""Plan review in headless Chromium when a researcher sent two versions before anyone reviewed them:
the page diffs against the last version this node approved (and says so), and offers the diff against
the immediately previous version as a second view."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from fedsilo.node.plans import PlanStore
from tests.support.creds import offline_credentials

from .helpers import PLAN_V1, GuiServer, init_node, login, make_data, new_context, start_gui

pytestmark = pytest.mark.browser

LEAK = "        self.leak = open('/etc/passwd').read()"
# v2 (never reviewed) adds a line that reads a system file; v3 changes the model on top of it.
PLAN_V2 = PLAN_V1.replace(
    "    def training_data(self, batch_size):\n", "    def training_data(self, batch_size):\n" + LEAK + "\n"
)
PLAN_V3 = PLAN_V2.replace("return nn.Linear(4, 2)", "return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("reviewnode")
    data, _ = make_data(root)
    nodedir = root / "node"
    init_node(nodedir, "hospital1", offline_credentials(root / "creds.json", "hospital1"), data)
    plans = PlanStore(nodedir)
    v1 = plans.submit(PLAN_V1, "HeartPlan", "researcher", "baseline")
    v1 = plans.approve(v1["sha256"], by="gui:alice", note="baseline reviewed")
    v2 = plans.submit(PLAN_V2, "HeartPlan", "researcher", "small fix")
    v3 = plans.submit(PLAN_V3, "HeartPlan", "researcher", "a hidden layer")
    return {"dir": nodedir, "v1": v1, "v2": v2, "v3": v3}


@pytest.fixture(scope="module")
def page(browser, node: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Page]:
    gui: GuiServer = start_gui(node["dir"], tmp_path_factory.mktemp("reviewlog") / "gui.log")
    context = new_context(browser, gui.url)
    page = context.new_page()
    login(page, gui.url, "alice")
    yield page
    context.close()
    gui.stop()


def test_diff_is_against_the_approved_version_and_says_so(page: Page, node: dict[str, Any], screenshots: Path) -> None:
    v1, v3 = node["v1"], node["v3"]
    page.goto(f"/plans/{v3['sha256']}")
    basis = page.locator("#diff-basis")
    expect(basis).to_contain_text("Changes since the version approved on")
    expect(basis).to_contain_text("by gui:alice")
    expect(basis).to_contain_text(v1["sha256"][:12])
    expect(page.locator("#diff-approved")).to_have_attribute("aria-current", "page")
    added = page.locator("pre.diff .add")
    # the unreviewed v2 line is a change here, not context
    expect(added.filter(has_text="open('/etc/passwd')")).to_have_count(1)
    expect(added.filter(has_text="nn.Sequential")).to_have_count(1)
    page.screenshot(path=screenshots / "plan-review-since-approved.png", full_page=True)


def test_second_view_diffs_against_the_previous_version(page: Page, node: dict[str, Any]) -> None:
    v2, v3 = node["v2"], node["v3"]
    page.goto(f"/plans/{v3['sha256']}")
    page.get_by_role("link", name=f"Since the previous version {v2['sha256'][:12]}").click()
    expect(page.locator("#diff-previous")).to_have_attribute("aria-current", "page")
    expect(page.locator("#diff-basis")).to_contain_text(f"Changes since the previous version {v2['sha256'][:12]}")
    diff = page.locator("pre.diff")
    expect(diff.locator(".add").filter(has_text="nn.Sequential")).to_have_count(1)
    expect(diff.locator(".add").filter(has_text="open('/etc/passwd')")).to_have_count(0)
    expect(diff).to_contain_text("open('/etc/passwd')")  # only as context in this view
    page.get_by_role("link", name="Since the approved version").click()
    expect(page.locator("#diff-approved")).to_have_attribute("aria-current", "page")


def test_one_view_when_the_previous_version_is_the_approved_one(page: Page, node: dict[str, Any]) -> None:
    page.goto(f"/plans/{node['v2']['sha256']}")
    expect(page.locator("#diff-approved")).to_have_count(1)
    expect(page.locator("#diff-previous")).to_have_count(0)
    expect(page.locator("pre.diff .add").filter(has_text="open('/etc/passwd')")).to_have_count(1)
    assert page.goto(f"/plans/{node['v2']['sha256']}?diff=nonsense").status == 404
