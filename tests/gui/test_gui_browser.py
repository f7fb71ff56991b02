"""The GUI under gunicorn (`fedsilo gui start`) on a real node directory, driven by headless Chromium."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import BrowserContext, Page, expect

from fedsilo.node.audit import AuditLog
from fedsilo.node.datasets import DatasetStore
from fedsilo.node.plans import PlanStore
from tests.support.creds import offline_credentials

from .helpers import (
    PLAN_V1,
    PLAN_V2,
    GuiServer,
    csrf_token,
    flashes,
    init_node,
    login,
    make_data,
    new_context,
    start_gui,
)

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("guinode")
    data, outside = make_data(root)
    # This module needs no running network: the node gets a credentials file instead of a network directory.
    creds = offline_credentials(root / "node-credentials.json", "hospital1")
    nodedir = root / "node"
    init_node(nodedir, "hospital1", creds, data)
    plans = PlanStore(nodedir)
    first = plans.submit(PLAN_V1, "HeartPlan", "researcher", "baseline model")
    second = plans.submit(PLAN_V2, "HeartPlan", "researcher", "a hidden layer")
    third = plans.submit(PLAN_V1.replace("Logistic regression", "Exfiltrate"), "OtherPlan", "researcher")
    return {"dir": nodedir, "data": data, "outside": outside, "plans": [first, second, third]}


@pytest.fixture(scope="module")
def server(node: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuiServer]:
    gui = start_gui(node["dir"], tmp_path_factory.mktemp("guilog") / "gui.log")
    yield gui
    gui.stop()


@pytest.fixture(scope="module")
def manager(browser, server: GuiServer) -> Iterator[tuple[BrowserContext, Page]]:
    """One browser session logged in as the data manager, shared by the module's tests."""
    context = new_context(browser, server.url)
    page = context.new_page()
    yield context, page
    context.close()


def test_login_refuses_wrong_password_then_logs_in(manager, server: GuiServer, screenshots: Path) -> None:
    _, page = manager
    page.goto("/plans")
    expect(page).to_have_url(f"{server.url}/login?next=/plans")
    page.screenshot(path=screenshots / "login.png", full_page=True)
    login(page, server.url, "alice", "not-the-password")
    assert "Wrong username or password." in flashes(page)
    login(page, server.url, "alice")
    expect(page.get_by_role("heading", name="Training plans")).to_be_visible()
    assert any("Logged in as alice" in f for f in flashes(page))
    (cookie,) = [c for c in manager[0].cookies() if c["name"] == "fedsilo_gui_session"]
    assert cookie["httpOnly"]
    assert cookie["sameSite"] == "Lax"


def test_every_asset_is_served_by_the_app(manager, server: GuiServer) -> None:
    context, page = manager
    seen: list[str] = []
    page.on("request", lambda req: seen.append(req.url))
    page.goto("/plans")
    page.get_by_role("link", name="HeartPlan").first.click()
    page.wait_for_load_state()
    assert seen and all(u.startswith(server.url) for u in seen), seen
    headers = context.request.get("/plans").headers
    assert "default-src 'none'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY"


def test_add_dataset_through_path_picker(manager, node: dict[str, Any], screenshots: Path) -> None:
    _, page = manager
    page.goto("/datasets/")
    page.get_by_role("link", name="Add a dataset").click()
    page.get_by_role("link", name="Browse the data roots").click()
    page.get_by_role("link", name=str(node["data"])).click()
    # The symlink to a folder outside the data root is not offered.
    expect(page.get_by_role("link", name="escape/")).to_have_count(0)
    page.get_by_role("link", name="cardio/").click()
    page.screenshot(path=screenshots / "dataset-picker.png", full_page=True)
    page.get_by_role("link", name="Use this CSV file").click()
    expect(page.get_by_label("Location")).to_have_value(str(node["data"] / "cardio" / "heart.csv"))
    page.get_by_label("Name", exact=True).fill("heart")
    page.get_by_label("Tags").fill("cardio, heart")
    page.get_by_label("Target column").fill("label")
    page.get_by_label("Description").fill("Cardiology cohort 2024")
    page.get_by_role("button", name="Add the dataset").click()
    assert "Dataset 'heart' added (64 samples, shape 64 × 5)." in flashes(page)
    expect(page.get_by_role("heading", name="Dataset heart")).to_be_visible()
    page.screenshot(path=screenshots / "dataset-detail.png", full_page=True)
    record = DatasetStore(node["dir"]).get("heart")
    assert record["tags"] == ["cardio", "heart"]
    assert record["added_by"] == "gui:alice"
    page.goto("/datasets/")
    expect(page.get_by_role("link", name="heart")).to_be_visible()
    page.screenshot(path=screenshots / "datasets.png", full_page=True)


def test_edit_dataset_tags(manager, node: dict[str, Any]) -> None:
    _, page = manager
    page.goto("/datasets/heart")
    page.get_by_label("Tags").fill("cardio, heart, 2024")
    page.get_by_role("button", name="Save changes").click()
    assert "Dataset 'heart' updated." in flashes(page)
    assert DatasetStore(node["dir"]).get("heart")["tags"] == ["cardio", "heart", "2024"]


def test_paths_outside_data_roots_are_refused(manager, node: dict[str, Any]) -> None:
    context, page = manager
    page.goto("/datasets/browse?path=" + str(node["outside"]))
    assert any("outside the node's data roots" in f for f in flashes(page))
    page.goto("/datasets/add")
    token = csrf_token(page)
    data = node["data"]
    attempts = {
        "outside": str(node["outside"] / "secret.csv"),
        "dotdot": f"{data}/../outside/secret.csv",
        "symlink": str(data / "escape" / "secret.csv"),
        "relative": "outside/secret.csv",
    }
    for label, path in attempts.items():
        form = {"csrf_token": token, "name": f"stolen-{label}", "tags": "x", "data_type": "csv", "path": path}
        resp = context.request.post("/datasets/add", form=form, headers={"Referer": page.url})
        assert resp.status == 400, label
        assert "Dataset not added" in resp.text(), label
    names = [d["name"] for d in DatasetStore(node["dir"]).list()]
    assert not [n for n in names if n.startswith("stolen")]


def test_approve_pending_plan_with_note(manager, node: dict[str, Any], screenshots: Path) -> None:
    _, page = manager
    second = node["plans"][1]
    page.goto("/plans")
    page.screenshot(path=screenshots / "plans-pending.png", full_page=True)
    page.get_by_role("link", name=second["sha256"][:12]).click()
    expect(page.locator("#sha256")).to_have_text(second["sha256"])
    # highlighted source (Pygments) and the diff against the first HeartPlan
    expect(page.locator(".source .highlight")).to_contain_text("class HeartPlan")
    expect(page.locator("pre.diff .add").first).to_contain_text("nn.Sequential")
    expect(page.locator("pre.diff .del").first).to_contain_text("return nn.Linear(4, 2)")
    page.screenshot(path=screenshots / "plan-review.png", full_page=True)
    page.get_by_label("Why approve?").fill("Reviewed: same data access as the approved baseline.")
    page.get_by_role("button", name="Approve this plan").click()
    assert f"Plan {second['sha256'][:12]} approved: it runs at the next round." in flashes(page)
    expect(page.locator("h1 .badge")).to_have_text("approved")
    plans = PlanStore(node["dir"])
    assert plans.status(second["sha256"]) == "approved"
    assert plans.get(second["sha256"])["decided_by"] == "gui:alice"


def test_reject_plan_needs_a_note(manager, node: dict[str, Any]) -> None:
    context, page = manager
    third = node["plans"][2]
    page.goto(f"/plans/{third['sha256']}")
    # the browser enforces `required`; the server enforces it too
    resp = context.request.post(f"/plans/{third['sha256']}/reject", form={"csrf_token": csrf_token(page), "note": "  "})
    assert "Write a note explaining why you reject this plan" in resp.text()
    assert PlanStore(node["dir"]).status(third["sha256"]) == "pending"
    page.get_by_label("Why reject?").fill("Reads files outside its dataset.")
    page.get_by_role("button", name="Reject this plan").click()
    assert any("rejected: rounds using it are refused" in f for f in flashes(page))
    assert PlanStore(node["dir"]).status(third["sha256"]) == "rejected"


def test_revoke_approval(manager, node: dict[str, Any]) -> None:
    _, page = manager
    first = node["plans"][0]
    page.goto(f"/plans/{first['sha256']}")
    page.get_by_label("Why approve?").fill("Baseline reviewed.")
    page.get_by_role("button", name="Approve this plan").click()
    page.get_by_label("Why revoke the approval?").fill("Superseded by the newer version.")
    page.get_by_role("button", name="Revoke the approval").click()
    assert any("Approval of plan" in f and "revoked" in f for f in flashes(page))
    assert PlanStore(node["dir"]).status(first["sha256"]) == "rejected"


def test_post_without_csrf_token_is_refused(manager, node: dict[str, Any]) -> None:
    context, _ = manager
    plan = PlanStore(node["dir"]).submit(PLAN_V1 + "\n# v3\n", "HeartPlan", "researcher")
    resp = context.request.post(f"/plans/{plan['sha256']}/approve", form={"note": "no token"})
    assert resp.status == 400
    assert "security token was missing or expired" in resp.text()
    assert PlanStore(node["dir"]).status(plan["sha256"]) == "pending"


def test_viewer_cannot_approve(browser, server: GuiServer, node: dict[str, Any]) -> None:
    plan = PlanStore(node["dir"]).submit(PLAN_V1 + "\n# v4\n", "HeartPlan", "researcher")
    context = new_context(browser, server.url)
    try:
        page = context.new_page()
        login(page, server.url, "vic")
        page.goto(f"/plans/{plan['sha256']}")
        expect(page.get_by_role("button", name="Approve this plan")).to_have_count(0)
        expect(page.get_by_text("Your account can read this plan but not decide on it.")).to_be_visible()
        # Not just a hidden button: the server refuses the request itself, with a valid CSRF token.
        resp = context.request.post(
            f"/plans/{plan['sha256']}/approve", form={"csrf_token": csrf_token(page), "note": "let me in"}
        )
        assert resp.status == 403
        resp = context.request.post(
            "/datasets/add",
            form={"csrf_token": csrf_token(page), "name": "v", "tags": "v", "data_type": "csv",
                  "path": str(node["data"] / "cardio" / "heart.csv")},
        )  # fmt: skip
        assert resp.status == 403
        assert PlanStore(node["dir"]).status(plan["sha256"]) == "pending"
    finally:
        context.close()


def test_login_throttled_after_repeated_failures(browser, server: GuiServer) -> None:
    context = new_context(browser, server.url)
    try:
        page = context.new_page()
        for _ in range(5):
            login(page, server.url, "root", "wrong-password")
        login(page, server.url, "root")  # the right password, too late
        assert any("Too many failed attempts" in f for f in flashes(page))
        expect(page.get_by_role("heading", name="Log in")).to_be_visible()
    finally:
        context.close()


def test_activity_filters_and_csv(manager, node: dict[str, Any], screenshots: Path) -> None:
    context, page = manager
    page.goto("/activity/")
    page.screenshot(path=screenshots / "activity.png", full_page=True)
    page.get_by_label("Event").select_option("plan_approved")
    page.get_by_role("button", name="Filter").click()
    rows = page.locator("tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.first).to_contain_text("gui:alice")
    resp = context.request.get("/activity/export.csv?event=login_failed")
    assert resp.headers["content-type"].startswith("text/csv")
    entries = list(csv.DictReader(io.StringIO(resp.text())))
    assert {e["actor"] for e in entries} == {"alice", "root"}
    events = {e["event"] for e in AuditLog(node["dir"]).list()}
    assert {"login", "login_failed", "plan_approved", "plan_rejected", "plan_revoked", "dataset_added"} <= events


def test_status_page(manager, screenshots: Path) -> None:
    _, page = manager
    page.goto("/status/")
    expect(page.locator("#daemon-state")).to_have_text("offline")
    expect(page.get_by_text("fedsilo node start --dir")).to_be_visible()
    page.screenshot(path=screenshots / "status.png", full_page=True)


def test_remove_dataset_with_confirmation(manager, node: dict[str, Any]) -> None:
    _, page = manager
    page.goto("/datasets/heart")
    page.get_by_role("link", name="Remove this dataset…").click()
    page.get_by_label("Type the dataset's name").fill("not-it")
    page.get_by_role("button", name="Remove the dataset").click()
    assert any("Type the dataset's name exactly" in f for f in flashes(page))
    page.get_by_label("Type the dataset's name").fill("heart")
    page.get_by_role("button", name="Remove the dataset").click()
    assert any("removed from the node" in f for f in flashes(page))
    assert DatasetStore(node["dir"]).list() == []


def test_logout_ends_the_session(manager, server: GuiServer) -> None:
    context, page = manager
    cookies = context.cookies()
    page.goto("/plans")
    page.get_by_role("button", name="Log out").click()
    assert "You are logged out." in flashes(page)
    page.goto("/plans")
    expect(page).to_have_url(f"{server.url}/login?next=/plans")
    # A copy of the old cookie is worthless after logout.
    context.add_cookies(cookies)
    resp = context.request.get("/plans", max_redirects=0)
    assert resp.status == 302
    assert "/login" in resp.headers["location"]
