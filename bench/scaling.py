"""Scaling: per-round wall time, the researcher's CPU per node and each node's memory for K small-model nodes.

    .venv/bin/python bench/scaling.py --ks 3,10,25,50 --rounds 5
    .venv/bin/python bench/scaling.py --ks 25 --rounds 5 --profile 25     # cProfile of the researcher's rounds
    .venv/bin/python bench/scaling.py --ks 3,10 --model large --rounds 4 --plot /tmp/large.png   # CPU by part

For each K, one federation as `bench/run.py` builds it (`federation.py`: network, K `fedsilo node start`
daemons as processes with their sandboxed warm workers, the peerbench-v1 plan approved everywhere), then:

1. one untimed warm-up round, then R timed rounds (`Experiment.run_once`): wall time, and the researcher
   process's CPU (user + system, every thread) per round and per node;
2. the CPU seconds of each part of the benchmark during those rounds (`machine.CpuMeter`);
3. each node's memory: the daemon and its worker (bwrap and the Python inside), RSS and PSS (PSS shares
   torch's pages between the K workers, so it is what K nodes add up to on one machine);
4. with the nodes warm and the plan approved: `Experiment(...)` alone, and from `Experiment(...)` to its first
   round's result (issue 11's targets: under 1 s and 2 s).

Before each K it checks that the K nodes fit in the memory available now (the previous K's PSS per node
times K, with `--reserve-gib` left for the others on the machine) and stops there if not, saying so.
Writes `bench/results/scaling-<time>.json` and `.md`, and the plot `--plot` (default `bench/scaling.png`).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import resource
import time
from datetime import UTC, datetime
from pathlib import Path
from statistics import median
from typing import Any

import psutil
from federation import federation, load_workload, make_experiment
from machine import CpuMeter

REPO = Path(__file__).resolve().parents[1]


def _cpu_s() -> float:
    """This process's CPU seconds, all threads (the researcher's MQTT and transfer threads included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def daemon_process(nodedir: Path) -> psutil.Process:
    """The node daemon running on `nodedir` (its status.json names it)."""
    return psutil.Process(int(json.loads((nodedir / "status.json").read_text(encoding="utf-8"))["pid"]))


def memory_mib(procs: list[psutil.Process]) -> dict[str, float]:
    """MiB summed over `procs` (one that ended meanwhile left out): RSS, PSS and USS."""
    total = {"rss": 0.0, "pss": 0.0, "uss": 0.0}
    for proc in procs:
        try:
            info = proc.memory_full_info()
        except psutil.Error:
            continue
        for key in total:
            total[key] += getattr(info, key) / 2**20
    return total


def node_memory(nodedirs: list[Path]) -> list[dict[str, float]]:
    """Per node, MiB: RSS and PSS of the daemon and every process under it (bwrap, the worker)."""
    out = []
    for nodedir in nodedirs:
        daemon = daemon_process(nodedir)
        mib = memory_mib([daemon, *daemon.children(recursive=True)])
        out.append({"rss_mib": mib["rss"], "pss_mib": mib["pss"]})
    return out


def available_mib() -> float:
    return psutil.virtual_memory().available / 2**20


def run_k(W: Any, k: int, args: argparse.Namespace) -> dict[str, Any]:
    """One federation of k nodes: memory, R timed rounds, then a fresh Experiment to its first result."""
    base = Path(args.dir) / f"k{k}"
    with federation(W, k, args.model, base, broker=args.broker, threads=1, rounds=args.rounds + 1) as fed:
        memory = node_memory(fed.nodedirs)
        exp = fed.exp
        exp.run_once()  # warm-up: the nodes cache the plan, the researcher's connections are up
        idle = CpuMeter()  # what the parts use with no round running: their per-round CPU includes it x the wall
        idle.start()
        time.sleep(args.idle_s)
        idle.stop()
        meter = CpuMeter()
        meter.start()
        profile = cProfile.Profile() if k in args.profile else None
        walls, cpus = [], []
        for _ in range(args.rounds):
            t0, c0 = time.perf_counter(), _cpu_s()
            if profile is not None:
                profile.enable()
            exp.run_once()
            if profile is not None:
                profile.disable()
            walls.append(time.perf_counter() - t0)
            cpus.append(_cpu_s() - c0)
        foreign = meter.stop()
        parts = {name: sec / args.rounds for name, sec in meter.components.items()}
        for r, replies in exp.training_replies().items():
            if len(replies) != k or any(v.get("dropped") for v in replies.values()):
                raise RuntimeError(f"K={k} round {r + 1}: not every node replied")
        exp.close()

        t0 = time.perf_counter()
        second = make_experiment(W, fed.plan, k, args.model, fed.netdir, base / "experiments-2", 1)
        experiment_s = time.perf_counter() - t0
        second.run_once()
        first_result_s = time.perf_counter() - t0
        if len(second.training_replies()[0]) != k:
            raise RuntimeError(f"K={k}: the second experiment's first round lost nodes")
        second.close()
        load = os.getloadavg()
        sandbox = sorted(set(fed.sandbox))
    result = {
        "K": k,
        "rounds": args.rounds,
        "round_walls_s": walls,
        "round_wall_median_s": median(walls),
        "researcher_cpu_s": cpus,
        "researcher_cpu_per_node_ms": 1000 * median(cpus) / k,
        "cpu_s_per_round_by_part": parts,
        "idle_cpu_s_per_s_by_part": {name: sec / args.idle_s for name, sec in idle.components.items()},
        "node_memory_mib": memory,
        "node_pss_median_mib": median(m["pss_mib"] for m in memory),
        "node_rss_median_mib": median(m["rss_mib"] for m in memory),
        "experiment_s": experiment_s,
        "experiment_to_first_result_s": first_result_s,
        "foreign_cpu_share": foreign,
        "loadavg_after": load,
        "node_sandbox": sandbox,
        "setup_s": fed.setup_s,
    }
    if profile is not None:
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(40)
        result["researcher_profile"] = text.getvalue()
    return result


def table(results: list[dict[str, Any]]) -> str:
    head = ["K", "round wall median s", "per node ms", "researcher CPU/round ms", "researcher CPU per node ms",
            "daemons CPU/round ms", "workers CPU/round ms", "file store CPU/round ms", "node PSS MiB (RSS)",
            "Experiment() s", "to first result s", "foreign CPU"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        parts = r["cpu_s_per_round_by_part"]
        cells = [str(r["K"]), f"{r['round_wall_median_s']:.3f}", f"{1000 * r['round_wall_median_s'] / r['K']:.1f}",
                 f"{1000 * median(r['researcher_cpu_s']):.0f}", f"{r['researcher_cpu_per_node_ms']:.1f}",
                 f"{1000 * parts.get('node daemons', 0):.0f}", f"{1000 * parts.get('node workers', 0):.0f}",
                 f"{1000 * parts.get('file store', 0):.0f}",
                 f"{r['node_pss_median_mib']:.0f} ({r['node_rss_median_mib']:.0f})",
                 f"{r['experiment_s']:.2f}", f"{r['experiment_to_first_result_s']:.2f}",
                 "" if r["foreign_cpu_share"] is None else f"{r['foreign_cpu_share']:.0%}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path, note: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [r["K"] for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(ks, [r["round_wall_median_s"] for r in results], "o-", label="round wall median")
    k0, w0 = ks[0], results[0]["round_wall_median_s"]
    left.plot(ks, [w0 * k / k0 for k in ks], "--", color="grey", label=f"linear from K={k0}")
    left.set_xlabel("K (nodes, each a daemon + sandboxed worker)")
    left.set_ylabel("s")
    left.set_title("round wall time")
    left.legend()
    right.plot(ks, [r["researcher_cpu_per_node_ms"] for r in results], "o-", label="researcher CPU per node")
    right.set_xlabel("K")
    right.set_ylabel("ms per node per round")
    right.set_ylim(bottom=0)
    right.set_title("researcher CPU per node and round")
    right.legend()
    fig.suptitle(f"peerbench-v1 small model, fedsilo; {note}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="3,10,25,50")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", default="small", choices=["small", "large"])
    parser.add_argument("--broker", default="auto", choices=["auto", "mosquitto", "embedded"])
    parser.add_argument("--workload", default=str(REPO / ".." / "shared" / "bench"))
    parser.add_argument("--dir", default=str(REPO / "run" / "bench-scaling"))
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    parser.add_argument("--plot", default=str(REPO / "bench" / "scaling.png"))
    parser.add_argument("--reserve-gib", type=float, default=4.0, help="memory left to the machine's other users")
    parser.add_argument("--idle-s", type=float, default=5.0, help="seconds of idle CPU measured after warm-up")
    parser.add_argument("--profile", default="", help="K values whose rounds are profiled (researcher, cProfile)")
    args = parser.parse_args()
    args.profile = {int(k) for k in args.profile.split(",") if k}
    W = load_workload(Path(args.workload))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    results: list[dict[str, Any]] = []
    stopped = ""
    for k in (int(x) for x in args.ks.split(",")):
        if results:
            need = results[-1]["node_pss_median_mib"] * k * 1.2
            free = available_mib() - args.reserve_gib * 1024
            if need > free:
                stopped = (f"K={k} not run: {k} nodes need about {need / 1024:.1f} GiB (PSS per node at "
                           f"K={results[-1]['K']}, +20 %), {free / 1024:.1f} GiB available beyond the reserve")
                print(stopped, flush=True)
                break
        free_gib = available_mib() / 1024
        print(f"== K={k}: load average {os.getloadavg()[0]:.1f}, {free_gib:.1f} GiB available", flush=True)
        results.append(run_k(W, k, args))
        print(table(results[-1:]), flush=True)
    load = f"load average {os.getloadavg()[0]:.1f} at the end"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = f"# scaling ({stamp})\n\n{table(results)}\n\n{stopped}\n"
    for r in results:
        idle = ", ".join(f"{k} {1000 * v:.1f}" for k, v in sorted(r["idle_cpu_s_per_s_by_part"].items()))
        text += f"\nK={r['K']} idle CPU, ms per second: {idle}\n"
    for r in results:
        if "researcher_profile" in r:
            text += f"\n## researcher profile, K={r['K']}\n\n```\n{r['researcher_profile']}```\n"
    (out / f"scaling-{stamp}.md").write_text(text, encoding="utf-8")
    (out / f"scaling-{stamp}.json").write_text(json.dumps({"results": results, "stopped": stopped}, indent=1))
    if results:
        plot(results, Path(args.plot), f"{stamp}, {load}")
    print(text)


if __name__ == "__main__":
    main()
