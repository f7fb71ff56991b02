"""The biomedical tutorials run top to bottom by nbclient, at a reduced size, as a person runs them: each
notebook writes its synthetic data, starts a network and three node daemons (separate processes), registers
the data through the CLI, approves its plan as the data managers, trains, and prints a SUMMARY line that
these tests read. The executed copies go to test-output/.

- `notebooks/02-prostate-segmentation.ipynb`: MONAI UNet (the Fed-BioMed paper's settings) on three
  medical folders, one of which names its modality `T1` and serves it as `T1w` through a data loading plan;
  the Dice must improve over the rounds and the federated model must end within 0.05 Dice of the
  centralised baseline trained on the pooled data.
- `notebooks/03-mednist-classification.ipynb`: a small CNN on MedNIST-style image folders; accuracy and AUC
  per round must improve.

Each tutorial runs once, on one broker (the notebook's `FEDSILO_BROKER`), the module covering both: at load 14 on
the 2-core dev machine 02 took 5.5-7 minutes and 03 1.5-3, most of it fixed per-round cost (each round's
forked worker imports MONAI and rebuilds matplotlib's font cache in the sandbox: 20-30 s), and the brokers'
behaviour is covered by every other e2e module. 02 gets the embedded broker, which is always there."""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import nbformat
import pytest
import torch
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from tests.e2e.test_notebook import KERNEL, outputs_text, venv_kernel

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"

# Reduced sizes: a round costs about 30 s at load 14 on the 2-core dev machine whatever its size (each round's
# forked worker imports MONAI again), so the tests run few rounds of more local updates.
PROSTATE_SMALL = {"PROSTATE_SUBJECTS": "8", "PROSTATE_HELDOUT": "3", "PROSTATE_SIZE": "16", "PROSTATE_ROUNDS": "3",
                  "PROSTATE_UPDATES": "25"}  # fmt: skip
MEDNIST_SMALL = {"MEDNIST_PER_CLASS": "40", "MEDNIST_SIZE": "32", "MEDNIST_ROUNDS": "2", "MEDNIST_UPDATES": "20"}


def _pids(workdir: Path) -> list[int]:
    """The daemons a notebook started under `workdir`, from their own state files."""
    found = []
    for path in [*workdir.glob("*/status.json"), *workdir.glob("network/state.json")]:
        try:
            found.append(int(json.loads(path.read_text(encoding="utf-8"))["pid"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


def _stop_leftovers(workdir: Path) -> list[int]:
    """SIGTERM what the notebook left running (a failed cell never reaches its last one); returns those pids.

    Only processes whose command line names `workdir` are touched: a pid may have been reused."""
    left = []
    for pid in _pids(workdir):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(workdir) in cmdline:
            left.append(pid)
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while left and time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in left):
        time.sleep(0.2)
    return left


@pytest.fixture
def jupyter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A kernel on this interpreter and a work folder for the notebook (its network, nodes and data)."""
    venv_kernel(tmp_path / "jupyter")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    workdir = tmp_path / "tutorial"
    monkeypatch.setenv("FEDSILO_TUTORIAL_DIR", str(workdir))
    yield workdir
    _stop_leftovers(workdir)


def execute(name: str, test_output: Path, suffix: str, timeout: int = 600) -> dict[str, nbformat.NotebookNode]:
    """Run notebooks/`name` in its folder; the executed copy is saved even when a cell fails. Cells by id."""
    path = NOTEBOOKS / name
    nb = nbformat.read(path, as_version=4)
    assert not any(c.get("outputs") or c.get("execution_count") for c in nb.cells if c.cell_type == "code"), (
        "the notebook is stored with outputs: clear them before committing"
    )
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=timeout, resources={"metadata": {"path": str(NOTEBOOKS)}})
    executed = test_output / f"{path.stem}.{suffix}.executed.ipynb"
    try:
        client.execute()
    except CellExecutionError as exc:
        pytest.fail(f"{name} failed (executed copy: {executed}):\n{exc}")
    finally:
        nbformat.write(nb, executed)
    return {c.get("id"): c for c in nb.cells}


def summary(cells: dict[str, nbformat.NotebookNode]) -> dict:
    lines = [line for line in outputs_text(cells["summary"]).splitlines() if line.startswith("SUMMARY ")]
    assert lines, f"no summary line; outputs: {cells['summary'].get('outputs')}"
    return json.loads(lines[-1].removeprefix("SUMMARY "))


def has_figure(cell: nbformat.NotebookNode) -> bool:
    return any("image/png" in o.get("data", {}) for o in cell.get("outputs", []))


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("broker", ["embedded"])
def test_prostate_notebook(broker: str, jupyter: Path, test_output: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDSILO_BROKER", broker)
    for key, value in PROSTATE_SMALL.items():
        monkeypatch.setenv(key, value)
    cells = execute("02-prostate-segmentation.ipynb", test_output, broker)

    assert f"network: {broker} broker" in outputs_text(cells["federation"])
    assert "alias   T1 -> T1w" in outputs_text(cells["dlp"])
    assert outputs_text(cells["datamanager"]).count("is now approved") == 3
    result = summary(cells)
    assert result["rounds"] == 3 and result["nodes"] == ["hospital-a", "hospital-b", "hospital-c"], result
    # hospital-c's files say T1: its loading plan serves T1w, so one plan trains at all three
    assert result["served"] == {node: ["T1w", "label"] for node in result["nodes"]}, result["served"]
    dice = result["dice"]  # the global model after 0, 1, 2 rounds (as the nodes received it), then the final one
    assert len(dice) == 4 and dice[-1] > dice[0] + 0.2, dice
    pooled = result["heldout"]["pooled"]
    assert pooled["fl"] >= pooled["centralised"] - 0.05, pooled
    assert has_figure(cells["figure"]), "no image / ground truth / prediction figure"
    assert not _pids_alive(jupyter), "the notebook left daemons running"


@pytest.mark.timeout(900)
@pytest.mark.parametrize("broker", [pytest.param("mosquitto", marks=pytest.mark.mosquitto)])
def test_mednist_notebook(broker: str, jupyter: Path, test_output: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDSILO_BROKER", broker)
    for key, value in MEDNIST_SMALL.items():
        monkeypatch.setenv(key, value)
    cells = execute("03-mednist-classification.ipynb", test_output, broker)

    assert f"network: {broker} broker" in outputs_text(cells["federation"])
    assert outputs_text(cells["datamanager"]).count("is now approved") == 3
    result = summary(cells)
    assert result["rounds"] == 2 and result["nodes"] == ["hospital-a", "hospital-b", "hospital-c"], result
    # rows: the global model after 0, 1 rounds (tested by the nodes as received), then the final one
    accuracy, auc = result["accuracy"], result["auc"]
    assert len(accuracy) == len(auc) == 3, result
    assert accuracy[-1] > accuracy[0] + 0.2 and accuracy[-1] > 0.6, accuracy  # 5 classes: chance is 0.2
    assert auc[-1] > auc[0] and auc[-1] > 0.85, auc
    assert has_figure(cells["plot"]), "no accuracy/AUC figure"
    assert not _pids_alive(jupyter), "the notebook left daemons running"


def _pids_alive(workdir: Path) -> list[int]:
    return [p for p in _pids(workdir) if Path(f"/proc/{p}").exists()]


# ------------------------------------------------------------------------------------ bench/prostate.py
def _bench() -> ModuleType:
    sys.path.insert(0, str(REPO / "bench"))  # bench scripts import their neighbours (machine.py) by name
    try:
        return importlib.import_module("prostate")
    finally:
        sys.path.remove(str(REPO / "bench"))


def test_the_bench_trains_the_notebooks_plan_with_the_papers_settings(tmp_path: Path) -> None:
    from monai.networks.nets import UNet

    plan = _bench().notebook_plan(tmp_path)()
    plan.post_init({"channels": [16, 32, 64, 128, 256]}, {"optimizer_args": {"lr": 0.1, "momentum": 0.9}})
    model = plan.model()
    assert isinstance(model, UNet)
    assert (model.channels, model.strides, model.num_res_units, model.dropout) == ((16, 32, 64, 128, 256),
                                                                                    (2, 2, 2, 2), 3, 0.3)  # fmt: skip
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in model.modules())
    optimizer = plan.optimizer()
    assert isinstance(optimizer, torch.optim.SGD)
    assert (optimizer.defaults["lr"], optimizer.defaults["momentum"]) == (0.1, 0.9)


def test_a_round_splits_into_the_slowest_nodes_training_and_the_overhead() -> None:
    def reply(train: float, total: float) -> dict:
        return {"dropped": None, "timings": {"train_s": train, "total_s": total, "download_s": 0.5, "upload_s": 0.5}}

    replies = {"hospital-a": reply(10.0, 30.0), "hospital-b": reply(14.0, 32.0),
               "hospital-c": {"dropped": {"kind": "timeout"}}}  # fmt: skip
    split = _bench().split_round(replies, {"wall_s": 40.0, "prepare_s": 1.0, "handle_s": 2.0})
    assert split["nodes"] == ["hospital-a", "hospital-b"]  # a dropped node has no timings and trains nothing
    assert (split["training_s"], split["overhead_s"], split["overhead_share"]) == (14.0, 26.0, 0.65)
    assert split["worker_other_s"] == {"hospital-a": 19.0, "hospital-b": 17.0}
