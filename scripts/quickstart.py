"""The fedsilo demo: a network, three hospital nodes as separate processes, a plan approved through
each node's CLI by its data manager, and 5 rounds of FedAvg on tabular data with label skew.

Run through `scripts/quickstart` (which sets up first). Everything lives under `run/quickstart/`.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedsilo.common.datasets import CsvDataset
from fedsilo.common.plan_source import plan_hash, plan_source
from fedsilo.common.synthetic import FEATURES, features_and_labels, synthetic_cohort, write_cohort_csv
from fedsilo.common.training_plan import DataManager, TorchTrainingPlan
from fedsilo.network.launcher import NetworkHandle
from fedsilo.network.provision import NetworkConfig
from fedsilo.node.config import NodeConfig
from fedsilo.node.launcher import NodeHandle, start_node
from fedsilo.node.sandbox import probe
from fedsilo.researcher import Experiment, FedAverage

REPO = Path(__file__).resolve().parents[1]
HOSPITALS = {"hospital-a": 0.2, "hospital-b": 0.5, "hospital-c": 0.8}  # share of positive cases


class DiabetesMLP(TorchTrainingPlan):
    """A small MLP for a binary outcome from tabular features."""

    def init_model(self, model_args: dict) -> nn.Module:
        hidden = model_args.get("hidden", 32)
        return nn.Sequential(
            nn.Linear(model_args["in_features"], hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, 2),
        )

    def init_optimizer(self, optimizer_args: dict) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model().parameters(), lr=optimizer_args.get("lr", 1e-3))

    def training_data(self, batch_size: int) -> DataManager:
        return DataManager(CsvDataset(self.dataset_path, target="label"), batch_size=batch_size, shuffle=True)

    def training_step(self, data: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self.model()(data), target)


def fedsilo(*args: str, quiet: bool = False) -> str:
    """Run one `fedsilo` CLI command as a person would, echoing it."""
    cmd = [str(Path(sys.executable).with_name("fedsilo")), *args]
    if not quiet:
        print("  $ fedsilo " + " ".join(args))
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"command failed: fedsilo {' '.join(args)}\n{out.stderr.strip()}")
    return out.stdout


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when something listens on host:port (bound the way the broker and the file store bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def choose_port(requested: int | None, name: str) -> int:
    """The port to give `fedsilo network start` for `name` ("mqtt" or "http"); 0 means a free one.

    Not given: the network's default port (1883, 8800), or a free one with a message when another
    network or broker already holds it. Given and taken: stop here with what to do instead.
    """
    option = f"--{name}-port"
    if requested == 0:
        return 0
    if requested is None:
        default = NetworkConfig.model_fields[f"{name}_port"].default
        if not port_in_use(default):
            return default
        print(f"   port {default} is in use (another network or broker?): using a free one ({option} chooses)")
        return 0
    if port_in_use(requested):
        raise SystemExit(f"{option} {requested}: the port is in use; choose another, or {option} 0 for a free one")
    return requested


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", default=str(REPO / "run" / "quickstart"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--broker", default="auto", choices=["auto", "embedded", "mosquitto"])
    for name, what in (("mqtt", "MQTT broker"), ("http", "file store")):
        default = NetworkConfig.model_fields[f"{name}_port"].default
        parser.add_argument(
            f"--{name}-port", type=int, default=None, metavar="PORT",
            help=f"{what} port; 0 = a free one (default {default}, or a free one when {default} is in use)",
        )  # fmt: skip
    parser.add_argument(
        "--keep-running",
        action="store_true",
        help="after the demo, keep the network and the nodes up (until Ctrl-C) for notebooks/01-getting-started.ipynb",
    )
    args = parser.parse_args()

    base = Path(args.dir)
    shutil.rmtree(base, ignore_errors=True)
    (base / "data").mkdir(parents=True)
    started = time.perf_counter()
    procs: list[NetworkHandle | NodeHandle] = []
    try:
        print("1. network: broker + file store")
        ports = [choose_port(args.mqtt_port, "mqtt"), choose_port(args.http_port, "http")]
        network = NetworkHandle(netdir=base / "network", broker=args.broker, log_path=base / "network.log")
        procs.append(network)
        network.start(extra_args=["--mqtt-port", str(ports[0]), "--http-port", str(ports[1])])
        print(f"   {network.broker_kind} broker on port {network.mqtt_port}, file store at {network.filestore_url}")

        print("2. three hospitals register their data and start their node")
        sandbox = probe("bwrap")
        if not sandbox.active:  # a demo on this machine only; a real node refuses rounds instead (FS505)
            print(f"   WARNING: {sandbox.detail}; the demo nodes run plans without the sandbox")
        rng = np.random.default_rng(2024)
        for name, share in HOSPITALS.items():
            csv = base / "data" / f"{name}.csv"
            write_cohort_csv(csv, synthetic_cohort(rng, 1500, share))
            node_dir = base / name
            fedsilo("node", "init", "--dir", str(node_dir), "--name", name, "--network", str(network.netdir),
                    "--data-root", str(base / "data"), "--threads", "1", quiet=name != "hospital-a")
            if not sandbox.active:
                cfg = NodeConfig.load(node_dir)
                cfg.node.sandbox = "off"
                cfg.save()
            fedsilo("node", "dataset", "add", "--dir", str(node_dir), "--name", "diabetes-cohort",
                    "--tags", "diabetes,tabular", "--type", "csv", "--path", str(csv),
                    "--description", f"synthetic cohort, {share:.0%} positive", quiet=name != "hospital-a")
            procs.append(start_node(node_dir))
        print(fedsilo("node", "dataset", "list", "--dir", str(base / "hospital-a"), quiet=True))

        print("3. the researcher proposes a training plan")
        exp = Experiment(
            tags=["diabetes"],
            training_plan_class=DiabetesMLP,
            model_args={"in_features": FEATURES, "hidden": 32},
            training_args={"epochs": 1, "batch_size": 32, "optimizer_args": {"lr": 3e-3}, "log_interval": 10,
                           "test_ratio": 0.2},
            round_limit=args.rounds,
            aggregator=FedAverage(),
            network=str(network.netdir),
            experimentation_folder=str(base / "experiments"),
            tensorboard=True,
            save_breakpoints=True,
        )
        with exp:
            print(exp.training_plan_approve(description="MLP on the diabetes cohort (quickstart)"))
            sha = plan_hash(plan_source(DiabetesMLP))

            print(f"4. each data manager reviews plan {sha[:12]} and approves it")
            for name in HOSPITALS:
                fedsilo("node", "plan", "approve", sha[:12], "--dir", str(base / name),
                        "--note", "reviewed: MLP, no data export", quiet=name != "hospital-a")
            print(exp.check_training_plan_status())

            print(f"5. federated training: {args.rounds} rounds of FedAvg")
            exp.run()
            print(exp.metrics_table(["loss", "test_loss", "test_accuracy"]))
            print("\nper round, weighted over the nodes:")
            print(exp.metrics_table(["loss", "test_loss", "test_accuracy"], per="round"))

            x, y = map(torch.from_numpy, features_and_labels(synthetic_cohort(np.random.default_rng(99), 4000, 0.5)))
            model = exp.training_plan().model().eval()
            with torch.no_grad():
                accuracy = (model(x).argmax(1) == y).float().mean().item()
            print(f"\nheld-out accuracy of the federated model (balanced, 4000 patients): {accuracy:.3f}")
            print(f"tensorboard --logdir {exp.tensorboard_dir()}   # loss curves per node and round")
        print(f"demo done in {time.perf_counter() - started:.1f}s")
        if args.keep_running:
            keep_running(base, procs)
    finally:
        for proc in reversed(procs):
            proc.stop()
    print(f"everything is under {base}")


def keep_running(base: Path, procs: list[NetworkHandle | NodeHandle]) -> None:
    """Wait (until Ctrl-C or a daemon exits) while a person runs the getting-started notebook."""
    bindir = Path(sys.executable).parent
    if bindir.is_relative_to(REPO):
        bindir = bindir.relative_to(REPO)
    lines = [
        f"cd {REPO}",
        f"export FEDSILO_NETWORK={(base / 'network').resolve()}",
        "export FEDSILO_NODES=" + ",".join(str((base / name).resolve()) for name in HOSPITALS),
    ]
    if not (Path(sys.executable).parent / "jupyter-lab").exists():
        lines.append(f"{bindir / 'pip'} install -c envs/constraints.txt jupyterlab   # once")
    lines.append(f"{bindir / 'jupyter'} lab notebooks/01-getting-started.ipynb")
    print("\nThe network and the three nodes keep running; Ctrl-C stops them. In another terminal:\n")
    print("\n".join("  " + line for line in lines) + "\n", flush=True)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # the daemons run in their own sessions: stop them on a closed terminal or a kill too, not only on Ctrl-C
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)
    try:
        while True:
            for proc in procs:
                if proc.proc is None or proc.proc.poll() is not None:
                    raise SystemExit(f"a daemon exited; see its log {proc.log_path}")
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("\nstopping the nodes and the network", flush=True)


if __name__ == "__main__":
    main()
