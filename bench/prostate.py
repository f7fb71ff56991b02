"""The prostate experiment's round time, split into training and FL overhead (issue 9).

The Fed-BioMed paper reports 39-56 % of a round spent outside training in its prostate experiment. This runs
the same experiment as `notebooks/02-prostate-segmentation.ipynb` (the plan is that notebook's `plan` cell,
read from the notebook, not a copy; the paper's settings: UNet 16-256, SGD 0.1/0.9, batch 8, 25 local updates,
Dice loss, FedAvg) on three node daemons (processes, bwrap sandbox as configured by default) holding synthetic
medical folders, hospital-c serving its `T1` as `T1w` through a data loading plan, and prints per round:

- `training`: the slowest node's timed training steps (`timings.train_s`: forward, backward, step, as a
  centralised loop would spend them);
- `overhead` = the round's wall time (researcher side) - `training`, and its share of the round;
- where the overhead goes: per node, `total_s - train_s - download_s - upload_s` (the worker outside its
  training steps: the forked round's imports, plan and data loading), the transfers, and the researcher's
  `prepare_s` (serialise and upload the global model) and `handle_s` (download, check, add the updates).

    .venv/bin/python bench/prostate.py                       # full size: 32 subjects, 32^3, 3 rounds
    .venv/bin/python bench/prostate.py --size 16 --subjects 8 --rounds 2 --updates 10   # a quick look

Validation is off (`test_ratio` 0): the split measures training rounds. Results: the table on stdout and
`bench/results/prostate-<time>.json`; `bench/RESULTS.md` holds the numbers measured for the record.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from statistics import median
from typing import Any

from machine import CpuMeter

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "02-prostate-segmentation.ipynb"
HOSPITALS = ("hospital-a", "hospital-b", "hospital-c")


def notebook_plan(folder: Path) -> type:
    """The notebook's `ProstateUNet`, imported from a module file so that `Experiment` extracts its source."""
    cells = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
    source = "".join(next(c["source"] for c in cells if c.get("id") == "plan"))
    path = folder / "prostate_plan.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("prostate_plan", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["prostate_plan"] = module  # inspect.getsource finds the class's file through sys.modules
    spec.loader.exec_module(module)
    return module.ProstateUNet


def fedsilo(*args: Any) -> str:
    from fedsilo.common.processes import FEDSILO

    done = subprocess.run([*FEDSILO, *map(str, args)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"fedsilo {' '.join(map(str, args))}: {done.stderr.strip()}")
    return done.stdout


def import_seconds() -> float:
    """What a fresh interpreter takes to import the plan's MONAI modules (each round's worker pays it)."""
    code = ("import time; t = time.perf_counter(); import torch; t1 = time.perf_counter(); "
            "import monai.networks.nets, monai.losses, monai.transforms, monai.metrics; "
            "print(time.perf_counter() - t1)")  # fmt: skip
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def start(base: Path, args: argparse.Namespace, running: list[Any]) -> Any:
    """Data, a network and three started nodes (hospital-c with its loading plan); returns the network.

    `running` gets each process as it starts, so that the caller stops them even when a later step fails."""
    from fedsilo.common.synthetic_medical import make_prostate_sites
    from fedsilo.network.launcher import start_network
    from fedsilo.node.launcher import NodeHandle

    sites = make_prostate_sites(base / "data", args.subjects, (args.size,) * 3)
    network = start_network(base, broker=args.broker)
    running.append(network)
    handles = []
    for node, folder in zip(HOSPITALS, sites, strict=True):
        nodedir = base / node
        fedsilo("node", "init", "--dir", nodedir, "--name", node, "--network", network.netdir,
                "--data-root", folder, "--threads", 1)  # fmt: skip
        fedsilo("node", "dataset", "add", "--dir", nodedir, "--name", "prostate", "--tags", "prostate",
                "--type", "medical-folder", "--path", folder, "--demographics", folder / "participants.csv",
                "--index-col", "participant_id", "--label-modality", "label")  # fmt: skip
        handles.append(NodeHandle(nodedir=nodedir, log_path=nodedir / "logs" / "daemon.out"))
    fedsilo("node", "dataset", "dlp", "set", "--dir", base / "hospital-c", "prostate", "--alias", "T1=T1w")
    for handle in handles:
        handle.start(wait=False)
        running.append(handle)
    for handle in handles:
        handle.wait_ready()
    return network


def split_round(replies: dict[str, dict], stats: dict[str, float]) -> dict[str, Any]:
    """One round's wall time split into the slowest node's training and the rest."""
    ok = {n: v for n, v in replies.items() if not v.get("dropped")}
    timings = {n: v["timings"] for n, v in ok.items()}
    training = max(t["train_s"] for t in timings.values())
    wall = stats["wall_s"]
    return {
        "wall_s": wall,
        "training_s": training,
        "overhead_s": wall - training,
        "overhead_share": (wall - training) / wall,
        "worker_other_s": {
            n: t["total_s"] - t["train_s"] - t["download_s"] - t["upload_s"] for n, t in timings.items()
        },
        "transfer_s": {n: t["download_s"] + t["upload_s"] for n, t in timings.items()},
        "prepare_s": stats.get("prepare_s"),
        "handle_s": stats.get("handle_s"),
        "nodes": sorted(ok),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=32, help="subjects per hospital (the notebook's full size)")
    parser.add_argument("--size", type=int, default=32, help="cube side in voxels (multiple of 16)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--updates", type=int, default=25, help="local updates per round (the paper: 25)")
    parser.add_argument("--channels", default="16,32,64,128,256")
    parser.add_argument("--broker", default="auto", choices=["auto", "embedded", "mosquitto"])
    parser.add_argument("--dir", type=Path, default=REPO / "run" / "bench-prostate")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()

    import shutil

    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    plan = notebook_plan(args.dir)
    from fedsilo.researcher import Experiment, FedAverage

    meter, running = CpuMeter(), []
    try:
        network = start(args.dir, args, running)
        exp = Experiment(tags=["prostate"], training_plan_class=plan,
                         model_args={"channels": [int(c) for c in args.channels.split(",")]},
                         training_args={"epochs": 1, "num_updates": args.updates, "batch_size": 8, "random_seed": 3,
                                        "optimizer_args": {"lr": 0.1, "momentum": 0.9}, "log_interval": 25},
                         round_limit=args.rounds, aggregator=FedAverage(), network=network.netdir,
                         experimentation_folder=args.dir / "experiments", round_timeout=1800)  # fmt: skip
        with exp:
            exp.training_plan_approve(description="bench/prostate.py")
            for node in HOSPITALS:
                fedsilo(
                    "node", "plan", "approve", exp.training_plan_hash(), "--dir", args.dir / node, "--note", "bench"
                )
            meter.start()
            exp.run()
            foreign = meter.stop()
            rounds = [split_round(exp.training_replies()[r], exp.round_stats()[r]) for r in range(args.rounds)]
    finally:
        for proc in reversed(running):
            proc.stop()
    imports = import_seconds()
    report(args, rounds, foreign, imports)


def report(args: argparse.Namespace, rounds: list[dict[str, Any]], foreign: float | None, imports: float) -> None:
    print(f"prostate: 3 nodes x {args.subjects} subjects, {args.size}^3, {args.updates} updates/round, "
          f"channels {args.channels}, other processes' CPU share during the rounds: "
          f"{'-' if foreign is None else f'{foreign:.0%}'}")  # fmt: skip
    print(
        "| round | wall s | training s (slowest node) | overhead s | overhead % | worker outside training s "
        "(median node) | transfers s (median node) | researcher prepare + handle s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(rounds):
        print(f"| {i} | {r['wall_s']:.1f} | {r['training_s']:.1f} | {r['overhead_s']:.1f} | {r['overhead_share']:.0%} "
              f"| {median(r['worker_other_s'].values()):.1f} | {median(r['transfer_s'].values()):.2f} "
              f"| {(r['prepare_s'] or 0) + (r['handle_s'] or 0):.2f} |")  # fmt: skip
    print(f"MONAI's import in a fresh interpreter (after torch): {imports:.1f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = args.out / f"prostate-{stamp}.json"
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    record = {"settings": settings, "rounds": rounds, "foreign_cpu": foreign, "monai_import_s": imports, "at": stamp}
    path.write_text(json.dumps(record, indent=1))
    print(f"raw numbers: {path}")


if __name__ == "__main__":
    main()
