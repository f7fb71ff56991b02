"""The GUI's dataset forms come from the type registry: a medical folder (with its demographics CSV chosen in
the confined picker) and a semicolon clinical table are added, described without patient values, and the
medical folder's loading plan is edited; hostile form posts are refused with nothing stored."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import BrowserContext, Page, expect

from fedsilo.common.synthetic_medical import SCANNERS, make_prostate_site
from fedsilo.node.datasets import DatasetStore
from fedsilo.node.loading_plans import LoadingPlanStore
from tests.support.creds import offline_credentials

from .helpers import GuiServer, csrf_token, flashes, init_node, login, new_context, start_gui

pytestmark = pytest.mark.browser

CLINICAL = "RID;AGE;SEX;DX\n" + "".join(
    f"{900 + i};{60 + i};{'MF'[i % 2]};{'CN' if i < 10 else 'AD'}\n" for i in range(11)
)  # 10 CN and one AD patient: the AD label must not be shown


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("guitypes")
    data = root / "data"
    site = make_prostate_site(data / "prostate", SCANNERS[2], subjects=6, shape=(4, 8, 8), seed=3)
    (data / "clinical.csv").write_text(CLINICAL)
    outside = root / "outside"
    outside.mkdir()
    (outside / "participants.csv").write_text((site / "participants.csv").read_text())
    (data / "escape.csv").symlink_to(outside / "participants.csv")
    creds = offline_credentials(root / "node-credentials.json", "hospital1")
    nodedir = root / "node"
    init_node(nodedir, "hospital1", creds, data)
    return {"dir": nodedir, "data": data, "site": site, "outside": outside}


@pytest.fixture(scope="module")
def server(node: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuiServer]:
    gui = start_gui(node["dir"], tmp_path_factory.mktemp("guilog") / "gui.log")
    yield gui
    gui.stop()


@pytest.fixture(scope="module")
def manager(browser, server: GuiServer) -> Iterator[tuple[BrowserContext, Page]]:
    context = new_context(browser, server.url)
    page = context.new_page()
    login(page, server.url, "alice")
    yield context, page
    context.close()


def test_add_a_medical_folder_with_its_demographics_from_the_picker(manager, node, screenshots: Path) -> None:
    _, page = manager
    page.goto("/datasets/add")
    page.get_by_role("link", name="Medical folder (NIfTI / DICOM per subject and modality)").click()
    page.get_by_role("link", name="Browse the data roots").click()
    page.get_by_role("link", name=str(node["data"])).click()
    expect(page.get_by_role("link", name="Use this CSV file")).to_have_count(0)  # only the chosen type's picks
    page.get_by_role("row", name="prostate/").get_by_role("link", name="Use as medical-folder").click()
    expect(page.get_by_label("Location")).to_have_value(str(node["site"]))
    page.get_by_role("link", name="Choose the demographics csv").click()
    page.get_by_role("row", name="participants.csv").get_by_role("link", name="Use this file").click()
    expect(page.get_by_label("Demographics CSV")).to_have_value(str(node["site"] / "participants.csv"))
    page.get_by_label("Name", exact=True).fill("prostate")
    page.get_by_label("Tags").fill("prostate, mri")
    page.get_by_label("Subject id column").fill("participant_id")
    page.get_by_label("Label/mask modality").fill("label")
    page.get_by_role("button", name="Add the dataset").click()
    assert any(f.startswith("Dataset 'prostate' added (6 samples") for f in flashes(page)), flashes(page)
    expect(page.get_by_role("heading", name="Dataset prostate")).to_be_visible()
    description = page.locator("#public-description").inner_text()
    assert "T1" in description and "sub-00" not in description and "site-c" not in description
    page.screenshot(path=screenshots / "dataset-medical-folder.png", full_page=True)
    rec = DatasetStore(node["dir"]).get("prostate")
    assert rec["data_type"] == "medical-folder" and rec["options"]["index_col"] == "participant_id"


def test_edit_the_loading_plan_of_the_medical_folder(manager, node, screenshots: Path) -> None:
    _, page = manager
    page.goto("/datasets/prostate")
    page.get_by_label("Modality aliases").fill("T1=T1w")
    page.get_by_label("Label values").fill("1=1")
    page.get_by_role("button", name="Save the loading plan").click()
    assert "Loading plan saved." in flashes(page)
    expect(page.locator("#loading-plan")).to_contain_text("T1 → T1w")
    page.screenshot(path=screenshots / "dataset-loading-plan.png", full_page=True)
    plan = LoadingPlanStore(node["dir"]).get("prostate")
    assert plan is not None and plan.aliases == {"T1": "T1w"}
    # A modality the dataset does not have, and a line that is not LOCAL=SERVED: refused, the plan kept.
    for aliases, message in (("T2=T1w", "no modality T2"), ("T1", "write LOCAL=SERVED")):
        page.get_by_label("Modality aliases").fill(aliases)
        page.get_by_role("button", name="Save the loading plan").click()
        assert any(message in f for f in flashes(page)), flashes(page)
        assert LoadingPlanStore(node["dir"]).get("prostate").aliases == {"T1": "T1w"}
    for label in ("Modality aliases", "Label values"):
        page.get_by_label(label).fill("")
    page.get_by_role("button", name="Save the loading plan").click()
    assert "Loading plan cleared." in flashes(page)
    assert LoadingPlanStore(node["dir"]).get("prostate") is None


def test_add_a_semicolon_table_with_its_type_options(manager, node) -> None:
    _, page = manager
    page.goto("/datasets/add")
    page.get_by_role("link", name="Browse the data roots").click()
    page.get_by_role("link", name=str(node["data"])).click()
    page.get_by_role("row", name="clinical.csv").get_by_role("link", name="Use this CSV file").click()
    page.get_by_label("Name", exact=True).fill("clinical")
    page.get_by_label("Tags").fill("adni")
    page.get_by_label("Target column").fill("DX")
    page.get_by_label("Missing values").select_option("drop-rows")
    page.get_by_role("button", name="Add the dataset").click()
    assert "Dataset 'clinical' added (11 samples, shape 11 × 4)." in flashes(page), flashes(page)
    description = page.locator("#public-description").inner_text()
    assert "categorical" in description and "CN" in description
    for value in ("AD", "900", "910", "70"):  # a label one patient has, ids, an age
        assert value not in description, value
    assert DatasetStore(node["dir"]).get("clinical")["options"]["delimiter"] == ";"


def test_hostile_posts_are_refused_and_nothing_is_stored(manager, node) -> None:
    """A valid data manager session posting what the form never offers."""
    context, page = manager
    page.goto("/datasets/add")
    token = csrf_token(page)
    site, data = node["site"], node["data"]
    attempts = {
        "demographics outside": {"demographics": str(node["outside"] / "participants.csv")},
        "demographics symlink": {"demographics": str(data / "escape.csv")},
        "demographics dotdot": {"demographics": f"{site}/../../outside/participants.csv"},
        "unknown type": {"data_type": "pickle"},
    }
    for label, extra in attempts.items():
        form = {"csrf_token": token, "name": f"stolen-{label}", "tags": "x", "data_type": "medical-folder",
                "path": str(site), "index_col": "participant_id", **extra}  # fmt: skip
        resp = context.request.post("/datasets/add", form=form, headers={"Referer": page.url})
        assert resp.status == 400, label
        assert "Dataset not added" in resp.text(), label
    assert not [d for d in DatasetStore(node["dir"]).list() if d["name"].startswith("stolen")]
