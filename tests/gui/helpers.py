"""Build a real node directory with GUI accounts and run `fedsilo gui start` as a subprocess for browser tests."""

from __future__ import annotations

import re
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from playwright.sync_api import BrowserContext, Page

from tests.support.plans import LOGREG_PLAN, LOGREG_PLAN_V2
from tests.support.procs import FEDSILO, free_port, start_process, stop_process

PASSWORDS = {"alice": "alice-password-1", "vic": "viewer-password-1", "root": "admin-password-1"}
ROLES = {"alice": "data_manager", "vic": "viewer", "root": "admin"}

PLAN_V1, PLAN_V2 = LOGREG_PLAN, LOGREG_PLAN_V2


def write_csv(path: Path, rows: int = 64, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 4))
    y = (x[:, 0] + x[:, 1] > 0).astype(int)
    lines = ["age,bp,chol,hr,label"] + [",".join(f"{v:.4f}" for v in r) + f",{t}" for r, t in zip(x, y, strict=True)]
    path.write_text("\n".join(lines) + "\n")


def make_data(root: Path) -> tuple[Path, Path]:
    """A data root with a CSV (in a subfolder), and a folder outside it reachable through a symlink."""
    data = root / "data"
    (data / "cardio").mkdir(parents=True)
    write_csv(data / "cardio" / "heart.csv")
    outside = root / "outside"
    outside.mkdir()
    write_csv(outside / "secret.csv", seed=1)
    (data / "escape").symlink_to(outside, target_is_directory=True)
    return data, outside


def init_node(nodedir: Path, name: str, network: Path, data_root: Path) -> None:
    """`fedsilo node init` and one GUI account per role, through the real CLI."""
    subprocess.run(
        [*FEDSILO, "node", "init", "--dir", str(nodedir), "--name", name, "--network", str(network),
         "--data-root", str(data_root)],
        check=True, capture_output=True,
    )  # fmt: skip
    for user, password in PASSWORDS.items():
        subprocess.run(
            [*FEDSILO, "gui", "user", "add", "--dir", str(nodedir), user, "--role", ROLES[user], "--password-stdin"],
            input=password + "\n", text=True, check=True, capture_output=True,
        )  # fmt: skip


@dataclass
class GuiServer:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def stop(self) -> None:
        stop_process(self.proc)


def start_gui(nodedir: Path, log_path: Path) -> GuiServer:
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            with urllib.request.urlopen(url + "/login", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    proc = start_process(
        [*FEDSILO, "gui", "start", "--dir", str(nodedir), "--port", str(port), "--workers", "2"],
        log_path,
        ready=ready,
        timeout=90,
    )
    return GuiServer(url, proc, log_path)


def login(page: Page, url: str, user: str, password: str | None = None) -> None:
    page.goto(url + "/login")
    page.get_by_label("Username").fill(user)
    page.get_by_label("Password").fill(password or PASSWORDS[user])
    page.get_by_role("button", name="Log in").click()
    page.wait_for_load_state()


def csrf_token(page: Page) -> str:
    """The token of the form on the current page (what a browser would send)."""
    match = re.search(r'name="csrf_token" value="([^"]+)"', page.content())
    assert match, "no CSRF token on this page"
    return match.group(1)


def flashes(page: Page) -> list[str]:
    """The page's flash messages, once there is one: every call follows an action that flashes, and a click that
    submits a form returns once the next page starts loading, maybe before its flashes are parsed (reading them
    at once failed `test_gui_decision_governs_the_next_round` once in a full run, 2026-12-02)."""
    page.locator(".flash").first.wait_for(state="attached")
    return [t.strip() for t in page.locator(".flash").all_inner_texts()]


def new_context(browser, url: str) -> BrowserContext:
    context = browser.new_context(base_url=url, viewport={"width": 1366, "height": 900})
    context.set_default_timeout(20_000)
    return context
