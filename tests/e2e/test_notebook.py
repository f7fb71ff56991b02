"""The getting-started notebook run top to bottom, as a person runs it after `scripts/quickstart
--keep-running`: a network and two hospital nodes as separate processes, small CSV cohorts registered
through the CLI, the notebook executed by nbclient on a kernel that is this interpreter (the project's
virtual environment). The executed copy goes to test-output/ for people to look at."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from fedsilo.common.synthetic import synthetic_cohort, write_cohort_csv
from tests.support.procs import FEDSILO, NetworkHandle, NodeHandle, start_network

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "notebooks" / "01-getting-started.ipynb"
HOSPITALS = {"hospital-a": 0.3, "hospital-b": 0.7}  # share of positive cases
ROWS = 400
KERNEL = "fedsilo-test"


def fedsilo(*args: str) -> None:
    done = subprocess.run([*FEDSILO, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"fedsilo {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[tuple[NetworkHandle, list[Path]]]:
    """A running network and two initialised, connected nodes, each with one registered CSV cohort."""
    procs: list[NetworkHandle | NodeHandle] = []
    try:
        network = start_network(tmp_path)
        procs.append(network)
        data = tmp_path / "data"
        data.mkdir()
        rng = np.random.default_rng(11)
        node_dirs = []
        for name, share in HOSPITALS.items():
            csv = write_cohort_csv(data / f"{name}.csv", synthetic_cohort(rng, ROWS, share))
            node_dir = tmp_path / name
            fedsilo("node", "init", "--dir", str(node_dir), "--name", name, "--network", str(network.netdir),
                    "--data-root", str(data), "--threads", "1")  # fmt: skip
            fedsilo("node", "dataset", "add", "--dir", str(node_dir), "--name", "diabetes-cohort",
                    "--tags", "diabetes,tabular", "--type", "csv", "--path", str(csv),
                    "--description", f"synthetic cohort, {share:.0%} positive")  # fmt: skip
            node_dirs.append(node_dir)
        nodes = [NodeHandle(nodedir=d, log_path=d / "logs" / "daemon.out") for d in node_dirs]
        for node in nodes:  # start both, then wait: their start-ups overlap
            node.start(wait=False)
            procs.append(node)
        for node in nodes:
            node.wait_ready()
        yield network, node_dirs
    finally:
        for proc in reversed(procs):
            proc.stop()


def venv_kernel(jupyter_path: Path) -> None:
    """A kernelspec whose kernel is this interpreter, so the notebook runs in the project's environment."""
    spec = jupyter_path / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "fedsilo", "language": "python"}))


def outputs_text(cell: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def test_getting_started_notebook(
    federation: tuple[NetworkHandle, list[Path]],
    tmp_path: Path,
    test_output: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    network, node_dirs = federation
    venv_kernel(tmp_path / "jupyter")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("FEDSILO_NETWORK", str(network.netdir))
    monkeypatch.setenv("FEDSILO_NODES", ",".join(str(d) for d in node_dirs))
    monkeypatch.setenv("FEDSILO_EXPERIMENTS", str(tmp_path / "experiments"))

    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(c.get("outputs") or c.get("execution_count") for c in nb.cells if c.cell_type == "code"), (
        "the notebook is stored with outputs: clear them before committing"
    )
    # Jupyter starts the kernel in the notebook's folder; so does this.
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=180, resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    executed = test_output / "01-getting-started.executed.ipynb"
    try:
        client.execute()
    except CellExecutionError as exc:
        pytest.fail(f"the notebook failed (executed copy: {executed}):\n{exc}")
    finally:
        nbformat.write(nb, executed)

    cells = {c.get("id"): c for c in nb.cells}
    plot = cells["round-means"].get("outputs", [])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        assert any("image/png" in o.get("data", {}) for o in plot), "matplotlib is installed but no plot came out"

    status = outputs_text(cells["datamanager"])
    assert status.count("is now approved") == len(node_dirs), status

    summary_lines = [line for line in outputs_text(cells["summary"]).splitlines() if line.startswith("SUMMARY ")]
    assert summary_lines, f"no summary line; outputs: {cells['summary'].get('outputs')}"
    summary = json.loads(summary_lines[-1].removeprefix("SUMMARY "))
    assert summary["rounds"] == 4  # 3 rounds, then one more after loading the breakpoint
    assert len(summary["loss"]) == 4 and len(summary["test_accuracy"]) == 4, summary
    assert summary["loss"][-1] < summary["loss"][0], f"the training loss did not go down: {summary['loss']}"
    assert summary["held_out_accuracy"] > 0.6, summary
