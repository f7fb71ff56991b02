"""Set-up shared by the benchmarks: a network and K node daemons as processes, an approved Experiment.

Everything an administrator would do is done with the `fedsilo` CLI (node init, dataset add, plan
approve); the workload (`../shared/bench/workload.py`) is imported, not re-implemented.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

TAG = "peerbench"


def load_workload(path: Path) -> Any:
    """Import `workload.py` from `path` in this (the researcher's) process. The node daemons do not get it on
    their PYTHONPATH: the plan carries the workload's text (`plan_class`)."""
    path = path.resolve()
    if not (path / "workload.py").is_file():
        raise SystemExit(f"--workload {path}: no workload.py there")
    sys.path.insert(0, str(path))
    return importlib.import_module("workload")


def plan_class(W: Any, folder: Path) -> type:
    """`peerbench_plan.PeerbenchPlan` with the workload's source written into its `WORKLOAD_SOURCE`: a copy of
    the plan file in `folder`, imported from there (the plan's shipped source is read from its file)."""
    template = Path(__file__).with_name("peerbench_plan.py").read_text(encoding="utf-8")
    marker = 'WORKLOAD_SOURCE = ""'
    if template.count(marker) != 1:
        raise RuntimeError(f"bench/peerbench_plan.py must hold exactly one `{marker}`")
    source = Path(W.__file__).read_text(encoding="utf-8")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "peerbench_plan_built.py"
    path.write_text(template.replace(marker, f"WORKLOAD_SOURCE = {source!r}"), encoding="utf-8")
    spec = importlib.util.spec_from_file_location("peerbench_plan_built", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.PeerbenchPlan


def fedsilo_cli(*args: str) -> str:
    """One `fedsilo` command, as an administrator would type it."""
    from fedsilo.common.processes import FEDSILO

    out = subprocess.run([*FEDSILO, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"fedsilo {' '.join(args)} failed:\n{out.stderr.strip()}")
    return out.stdout


def write_shard(W: Any, path: Path, k: int, num_clients: int) -> None:
    """Client k's rows as CSV (`%.9g`: every float32 survives the round trip), checked by reading it back."""
    from fedsilo.common.datasets import CsvDataset

    x, y = W.make_client_data(k, num_clients)
    header = ",".join([*(f"x{i}" for i in range(x.shape[1])), "label"])
    np.savetxt(
        path, np.column_stack([x, y]), fmt=["%.9g"] * x.shape[1] + ["%d"], delimiter=",", header=header, comments=""
    )
    back = CsvDataset(path, target="label")
    if back.x.numpy().tobytes() != x.tobytes() or back.y.numpy().tobytes() != y.tobytes():
        raise RuntimeError(f"{path}: the CSV does not read back to the workload's exact values")


def worker_ready(nodedir: Path) -> bool:
    """The node's daemon is connected and its warm training worker is up (status.json)."""
    from fedsilo.node.config import node_paths

    try:
        status = json.loads(node_paths(nodedir).status.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(status.get("broker_connected")) and bool(status.get("worker_pid"))


def sandbox_modes(nodedirs: list[Path]) -> list[str]:
    """Each node's worker sandbox as status.json reports it ("bwrap", or "off (inactive)"): the benchmark
    measures the product as shipped, so the result records whether plan code ran confined."""
    from fedsilo.node.config import node_paths

    modes = []
    for nodedir in nodedirs:
        state = json.loads(node_paths(nodedir).status.read_text(encoding="utf-8")).get("sandbox") or {}
        modes.append(str(state.get("mode")) + ("" if state.get("active") else " (inactive)"))
    return modes


@dataclass
class Federation:
    """What `federation()` set up: the researcher's experiment, the node folders, the broker kind, set-up seconds."""

    exp: Any
    plan: type
    netdir: Path
    nodedirs: list[Path]
    broker: str
    setup_s: float
    sandbox: list[str]


def make_experiment(W: Any, plan: type, num_clients: int, size: str, netdir: Path, folder: Path, rounds: int) -> Any:
    """The benchmark's `Experiment`: the workload's training arguments, FedAverage, all K nodes each round."""
    from fedsilo.researcher import DefaultStrategy, Experiment, FedAverage

    return Experiment(
        tags=[TAG],
        training_plan_class=plan,
        model_args={"size": size},
        training_args={
            "epochs": 1,
            "batch_size": W.BATCH_SIZE,
            "optimizer_args": {"lr": W.LR},
            "test_ratio": 0.0,
            "log_interval": W.LOCAL_STEPS,
        },
        round_limit=rounds,
        aggregator=FedAverage(),
        node_selection_strategy=DefaultStrategy(min_nodes=num_clients),
        network=str(netdir),
        experimentation_folder=str(folder),
    )


@contextlib.contextmanager
def federation(
    W: Any, num_clients: int, size: str, base: Path, *, broker: str, threads: int, rounds: int
) -> Iterator[Federation]:
    """Network, K nodes registered and started, the peerbench plan submitted and approved; all stopped after.

    The Experiment is made with `round_limit=rounds` and starts from the workload's initial model
    (checked parameter by parameter). Untimed: every daemon is connected and its worker warm."""
    from fedsilo.common.plan_source import plan_hash, plan_source
    from fedsilo.common.processes import wait_until
    from fedsilo.network.launcher import NetworkHandle, start_network
    from fedsilo.node.launcher import NodeHandle
    shutil.rmtree(base, ignore_errors=True)
    (base / "data").mkdir(parents=True)
    PeerbenchPlan = plan_class(W, base / "plan")
    procs: list[NetworkHandle | NodeHandle] = []
    t_setup = time.perf_counter()
    try:
        network = start_network(base, broker=broker)
        procs.append(network)
        nodes: list[NodeHandle] = []
        for k in range(num_clients):
            name, nodedir, csv = f"client-{k}", base / f"client-{k}", base / "data" / f"client-{k}.csv"
            write_shard(W, csv, k, num_clients)
            fedsilo_cli("node", "init", "--dir", str(nodedir), "--name", name, "--network", str(network.netdir),
                        "--data-root", str(base / "data"), "--threads", str(threads))  # fmt: skip
            fedsilo_cli("node", "dataset", "add", "--dir", str(nodedir), "--name",
                        f"{PeerbenchPlan.DATASET_PREFIX}{k}", "--tags", TAG, "--type", "csv", "--path", str(csv),
                        "--target", "label", "--description", f"peerbench-v1 client {k} of {num_clients}")  # fmt: skip
            handle = NodeHandle(nodedir=nodedir, log_path=nodedir / "logs" / "daemon.out")
            handle.start(wait=False)
            procs.append(handle)
            nodes.append(handle)
        for h in nodes:  # untimed: every daemon connected and its worker warm before round 1
            assert h.proc is not None
            wait_until(lambda h=h: worker_ready(h.nodedir), h.proc, h.log_path, 180.0, f"node {h.nodedir.name}")

        exp = make_experiment(W, PeerbenchPlan, num_clients, size, network.netdir, base / "experiments", rounds)
        with exp:
            if len(exp.training_data()) != num_clients:
                raise RuntimeError(f"{len(exp.training_data())} of {num_clients} nodes offer the '{TAG}' dataset")
            initial = W.state_to_numpy(W.build_model(size))
            local = {k: v.numpy() for k, v in exp.training_plan().get_parameters().items()}
            if local.keys() != initial.keys() or any((local[k] != v).any() for k, v in initial.items()):
                raise RuntimeError("the experiment's initial model is not workload.build_model(size)")
            exp.training_plan_approve(description="peerbench-v1 client (bench/)")
            sha = plan_hash(plan_source(PeerbenchPlan))
            for h in nodes:
                fedsilo_cli("node", "plan", "approve", sha[:12], "--dir", str(h.nodedir), "--note", "peerbench")
            status = exp.check_training_plan_status()
            if set(status.values()) != {"approved"}:
                raise RuntimeError(f"plan {sha[:12]} not approved everywhere: {status}")
            dirs = [h.nodedir for h in nodes]
            setup_s = time.perf_counter() - t_setup
            modes = sandbox_modes(dirs)
            yield Federation(exp, PeerbenchPlan, network.netdir, dirs, network.broker_kind, setup_s, modes)
    finally:
        for proc in reversed(procs):
            with contextlib.suppress(Exception):
                proc.stop()


@dataclass
class TimedRound:
    """One `run_once`, timed: its wall seconds, the foreign CPU share meanwhile (`CpuMeter.stop`), and the
    round's index, stats and replies."""

    wall_s: float
    foreign_cpu: float | None
    round: int
    stats: dict[str, Any]
    replies: dict[str, Any]


def timed_round(exp: Any, label: str) -> TimedRound:
    """Run one round and time it; a round where a node dropped is an error (it would measure a broken round)."""
    from machine import CpuMeter

    meter = CpuMeter()
    meter.start()
    t0 = time.perf_counter()
    exp.run_once()
    wall = time.perf_counter() - t0
    foreign = meter.stop()
    r = exp.round_current() - 1
    replies = exp.training_replies()[r]
    bad = {n: v["dropped"] for n, v in replies.items() if v.get("dropped")}
    if bad:
        raise RuntimeError(f"{label} round {r}: dropped {bad}")
    return TimedRound(wall, foreign, r, exp.round_stats()[r], replies)
