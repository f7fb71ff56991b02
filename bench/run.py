"""peerbench-v1 on fedsilo: K node daemons as separate processes, per-round wall time and overhead.

    .venv/bin/python bench/run.py --k 3 --model small
    .venv/bin/python bench/run.py --all

The workload (data, model, local training, metrics) is the shared `workload.py`, imported from
`--workload`; bench/README.md says what is measured and how it compares with the peer results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np
from federation import federation, load_workload
from machine import CpuMeter, wait_until_quiet

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WORKLOAD = REPO / ".." / "shared" / "bench"
CONFIGS = [(3, "small"), (3, "large"), (10, "small"), (10, "large")]
PEER_MODES = ("reference", "deployment", "deployment-tuned", "simulation")
COLUMNS = [
    "mode",
    "K",
    "model",
    "params",
    "total wall s",
    "round wall median s",
    "round 1 s",
    "client train median s",
    "overhead median s",
    "dispatch median s",
    "final acc",
]


# ====================================================================== the compute floor
REFERENCE_CODE = """
import json, sys
import workload as W
out = W.reference_run(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
out["params"] = W.num_params(W.build_model(sys.argv[2]))
print(json.dumps(out))
"""


def run_reference(workload_dir: Path, num_clients: int, size: str, rounds: int) -> dict[str, Any]:
    """`workload.reference_run` on this host, in a process of its own (it sets torch to one thread)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(workload_dir), os.environ.get("PYTHONPATH")) if p),
    }
    out = subprocess.run(
        [sys.executable, "-c", REFERENCE_CODE, str(num_clients), size, str(rounds)],
        capture_output=True,
        text=True,
        env=env,
    )
    if out.returncode != 0:
        raise RuntimeError(f"workload.reference_run failed:\n{out.stderr.strip()}")
    ref = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        **ref,
        "mode": "reference (this host)",
        "K": num_clients,
        "model": size,
        "dispatch_median_s": None,
        "workload_rounds": rounds,
    }


# ====================================================================== one configuration
def run_config(W: Any, num_clients: int, size: str, args: argparse.Namespace, quiet: float | None) -> dict[str, Any]:
    """Network, K nodes, approval, R timed rounds; the per-round record and its summary."""
    rounds = args.rounds
    load_before = os.getloadavg()
    base = Path(args.dir) / f"k{num_clients}-{size}"
    with federation(W, num_clients, size, base, broker=args.broker, threads=args.threads, rounds=rounds) as fed:
        exp, broker, setup_s = fed.exp, fed.broker, fed.setup_s
        meter = CpuMeter()
        meter.start()
        walls, starts = [], []
        t_all = time.perf_counter()
        for _ in range(rounds):
            starts.append(time.time())
            t0 = time.perf_counter()
            exp.run_once()
            walls.append(time.perf_counter() - t0)
        total_s = time.perf_counter() - t_all
        foreign = meter.stop()
        load_after = os.getloadavg()

        final = W.evaluate(exp.training_plan().model(), *W.make_test_data())
        replies, stats = exp.training_replies(), exp.round_stats()

    per_round = []
    for r in range(rounds):
        nodes_r = replies[r]
        bad = {n: v["dropped"] for n, v in nodes_r.items() if v.get("dropped")}
        if bad or len(nodes_r) != num_clients:
            raise RuntimeError(f"round {r + 1}: not every node replied: {bad}")
        per_round.append(_round_record(r, walls[r], starts[r], nodes_r, stats[r]))
    summary = W.summarize(per_round)
    return {
        "mode": "fedsilo",
        "broker": broker,
        "K": num_clients,
        "model": size,
        "params": W.num_params(W.build_model(size)),
        "workload_rounds": W.ROUNDS,
        "total_wall_s": total_s,
        **summary,
        "dispatch_median_s": _median_or_none([r["dispatch_median_s"] for r in per_round]),
        "final": final,
        "rounds": per_round,
        "setup_s": setup_s,
        "conditions": {
            "foreign_cpu_share_during_rounds": foreign,
            "node_sandbox": sorted(set(fed.sandbox)),
            "cpu_s_by_component": meter.components,
            "foreign_cpu_share_before": quiet,
            "loadavg_before": load_before,
            "loadavg_after": load_after,
        },
    }


def _round_record(r: int, wall: float, start: float, nodes: dict[str, Any], stats: dict[str, float]) -> dict[str, Any]:
    """One round: W_r, train_s per client and the derived per-node stages (seconds)."""
    per_node = {}
    for node, v in sorted(nodes.items()):
        t, m = v["timings"], v["metrics"]
        # The node's trainer runs the loop now and a plan reports no metrics of its own, so the plan's wall
        # clock (wall_start/wall_end) is there only in results of the older plan: without it, dispatch and
        # the node's exit are not measured (None) and the loop's untimed part is folded into before_train_s.
        clocked = "wall_start" in m
        train_wall = m["wall_end"] - m["wall_start"] if clocked else t["train_s"]
        before_train = t["total_s"] - train_wall - t["upload_s"]  # handler entered -> local training starts
        entered = m["wall_start"] - before_train if clocked else None
        per_node[node] = {
            "train_s": t["train_s"],
            "dispatch_s": entered - start if entered is not None else None,  # round start -> handler entered
            "before_train_s": before_train,
            "download_s": t["download_s"],
            "train_setup_s": train_wall - t["train_s"] if clocked else None,  # in the loop, outside the steps
            "upload_s": t["upload_s"],
            "node_total_s": t["total_s"],
            "after_node_s": wall - (entered - start) - t["total_s"] if entered is not None else None,
            "ack_s": v.get("ack_s"),
            "researcher_s": t.get("researcher_s"),
        }
    last = max(per_node.values(), key=lambda p: (p["dispatch_s"] or 0.0) + p["node_total_s"])
    dispatch = [p["dispatch_s"] for p in per_node.values() if p["dispatch_s"] is not None]
    return {
        "round": r + 1,
        "wall_s": wall,
        "client_train_s": [p["train_s"] for p in per_node.values()],
        "dispatch_median_s": median(dispatch) if dispatch else None,
        "researcher": stats,
        "critical_node_after_s": last["after_node_s"],
        "nodes": per_node,
    }


# ====================================================================== reporting
def read_peer_rows(results_md: Path) -> list[dict[str, str]]:
    """The rows of the peers' RESULTS.md table, as text cells keyed by column name."""
    rows = []
    if not results_md.is_file():
        return rows
    for line in results_md.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == len(COLUMNS) and cells[0] in PEER_MODES:
            rows.append(dict(zip(COLUMNS, cells, strict=True)))
    return rows


def table_row(res: dict[str, Any]) -> list[str]:
    return [
        res["mode"],
        str(res["K"]),
        res["model"],
        f"{res['params']:,}",
        f"{res['total_wall_s']:.2f}",
        f"{res['round_wall_median_s']:.3f}",
        f"{res['round1_wall_s']:.3f}",
        f"{res['client_train_median_s']:.4f}",
        f"{res['overhead_median_s']:.3f}",
        "" if res.get("dispatch_median_s") is None else f"{res['dispatch_median_s']:.3f}",
        f"{res['final']['accuracy']:.4f}",
    ]


def markdown(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def comparison(res: dict[str, Any], peers: list[dict[str, str]], local: dict[str, Any] | None) -> str:
    """fedsilo next to the reference on this host and the peer rows of the same K and model."""
    same = [p for p in peers if p["K"] == str(res["K"]) and p["model"] == res["model"]]
    ours = res["overhead_median_s"]

    def row(mode: str, wall: str, train: str, overhead: str, dispatch: str, acc: str) -> list[str]:
        ratio = f"{float(overhead) / ours:.2f}" if ours > 0 else "-"
        return [mode, wall, train, overhead, dispatch or "-", acc, ratio]

    rows = [row(*table_row(res)[:1], *_cmp_cells(table_row(res)))]
    if local is not None:
        rows.append(row(local["mode"], *_cmp_cells(table_row(local))))
    for p in same:
        cells = [p[c] for c in ("round wall median s", "client train median s", "overhead median s",
                                "dispatch median s", "final acc")]  # fmt: skip
        rows.append(row(p["mode"] + " (peer host)", *cells))
    headers = ["mode", "round wall median s", "client train median s", "overhead median s", "dispatch median s",
               "final acc", "overhead / fedsilo's"]  # fmt: skip
    text = f"K={res['K']} {res['model']}\n\n" + markdown(headers, rows)
    ref = next((p for p in same if p["mode"] == "reference"), None)
    if ref is not None and len(res["rounds"]) != res["workload_rounds"]:
        text += f"\n\nfinal accuracy not comparable: {len(res['rounds'])} rounds instead of {res['workload_rounds']}"
    elif ref is not None:
        delta = res["final"]["accuracy"] - float(ref["final acc"])
        verdict = "same computation" if abs(delta) <= 0.005 else "DIFFERENT: the workload was not run as specified"
        text += f"\n\nfinal accuracy {res['final']['accuracy']:.4f} vs reference {ref['final acc']} ({verdict})"
    return text


def _cmp_cells(cells: list[str]) -> list[str]:
    """round wall, client train, overhead, dispatch, final acc out of a `table_row`."""
    return [cells[5], cells[7], cells[8], cells[9], cells[10]]


STAGES = [
    ("researcher: serialise + upload global params, build requests", "prepare_s"),
    ("round start -> node round handler entered (dispatch)", "dispatch_s"),
    ("node: handler -> local training (plan/params download, approval, dataset, plan init)", "before_train_s"),
    ("  of which plan + params downloads", "download_s"),
    ("node: local_train outside the timed steps (batch order, optimiser)", "train_setup_s"),
    ("node: local_train timed steps (train_s = C)", "train_s"),
    ("node: serialise + upload update", "upload_s"),
    ("node handler left -> round aggregated (slowest node)", "critical_node_after_s"),
    ("researcher: download + check + add replies (all nodes)", "handle_s"),
    ("researcher: aggregate", "aggregate_s"),
    ("round wall W", "wall_s"),
]


def _median_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return median(known) if known else None


def stage_table(res: dict[str, Any]) -> str:
    """Median over rounds 2..R (round 1 is the cold start) of each stage, in milliseconds."""
    warm = res["rounds"][1:] or res["rounds"]
    rows = []
    for label, key in STAGES:
        if key in ("prepare_s", "handle_s", "aggregate_s"):
            values = [r["researcher"][key] for r in warm]
        elif key in ("critical_node_after_s", "wall_s"):
            values = [r[key] for r in warm]
        else:
            values = [n[key] for r in warm for n in r["nodes"].values()]
        known = [v for v in values if v is not None]
        rows.append([label, f"{1e3 * median(known):.1f}" if known else "-"])
    return markdown(["stage (rounds 2..R, median; node stages over all nodes)", "ms"], rows)


def cpu_table(res: dict[str, Any]) -> str:
    """CPU time each part of the benchmark used during the rounds, per round (10 ms clock ticks)."""
    parts = res["conditions"].get("cpu_s_by_component") or {}
    if not parts:
        return ""
    n = len(res["rounds"])
    rows = [[name, f"{1e3 * sec / n:.0f}"] for name, sec in sorted(parts.items(), key=lambda kv: -kv[1])]
    rows.append(["all of the benchmark", f"{1e3 * sum(parts.values()) / n:.0f}"])
    return markdown(["process (all rounds)", "CPU ms per round"], rows)


def conditions_line(res: dict[str, Any]) -> str:
    c = res["conditions"]
    foreign = c["foreign_cpu_share_during_rounds"]
    load = ", ".join(f"{x:.2f}" for x in c["loadavg_before"])
    text = f"K={res['K']} {res['model']}: load average before {load}"
    if foreign is not None:
        text += f"; other processes used {foreign:.0%} of the CPU during the rounds"
    sandbox = ", ".join(c.get("node_sandbox") or ["unknown"])
    return text + f"; node sandbox {sandbox}; setup {res['setup_s']:.0f} s (untimed)"


# ====================================================================== main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=3, help="number of clients (node daemons)")
    parser.add_argument("--model", default="small", choices=["small", "large"])
    parser.add_argument("--all", action="store_true", help="K=3,10 x small,large (see --skip)")
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="K:MODEL",
        help="with --all, leave this configuration out (repeatable), e.g. 10:large",
    )
    parser.add_argument("--rounds", type=int, default=None, help="default: the workload's R")
    parser.add_argument("--workload", default=str(DEFAULT_WORKLOAD), help="folder of workload.py and RESULTS.md")
    parser.add_argument("--dir", default=str(REPO / "run" / "bench"), help="working folder (wiped per run)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"), help="where results are written")
    parser.add_argument("--broker", default="auto", choices=["auto", "embedded", "mosquitto"])
    parser.add_argument("--threads", type=int, default=1, help="`fedsilo node init --threads` (workload: 1)")
    parser.add_argument("--repeat", type=int, default=1, help="run each configuration this many times")
    parser.add_argument("--no-reference", action="store_true", help="skip the no-framework run on this host")
    parser.add_argument(
        "--quiet-below",
        type=float,
        default=0.15,
        help="before each configuration wait until other processes use less than this share "
        "of the CPU (0: do not wait)",
    )
    parser.add_argument("--quiet-wait", type=float, default=300.0, help="longest wait for a quiet machine (s)")
    args = parser.parse_args()

    W = load_workload(Path(args.workload))
    args.rounds = args.rounds or W.ROUNDS
    configs = [(k, m) for k, m in CONFIGS if f"{k}:{m}" not in args.skip] if args.all else [(args.k, args.model)]
    peers = read_peer_rows(Path(args.workload) / "RESULTS.md")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    print(
        f"peerbench {W.WORKLOAD_VERSION} on fedsilo: {', '.join(f'K={k} {m}' for k, m in configs)}, "
        f"{args.rounds} rounds, {args.repeat} time(s) each; workload {Path(args.workload).resolve()}"
    )

    results, references = [], {}
    for num_clients, size in configs:
        for i in range(args.repeat):
            print(f"\n== K={num_clients} {size} ({i + 1}/{args.repeat}): data {W.data_fingerprint(num_clients)}")
            quiet = wait_until_quiet(args.quiet_below, args.quiet_wait)
            if not args.no_reference and (num_clients, size) not in references:
                print("   workload.reference_run on this host (no framework)", flush=True)
                ref = run_reference(Path(args.workload).resolve(), num_clients, size, args.rounds)
                references[num_clients, size] = ref
                print(markdown(COLUMNS, [table_row(ref)]))
            res = run_config(W, num_clients, size, args, quiet)
            results.append(res)
            print(markdown(COLUMNS, [table_row(res)]))
            print(conditions_line(res))

    report = [
        f"# peerbench {W.WORKLOAD_VERSION} on fedsilo ({stamp})",
        "",
        f"host {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"torch {_version('torch')}, numpy {np.__version__}, fedsilo {_version('fedsilo')}; "
        f"broker {results[0]['broker']}; node threads {args.threads}; {args.rounds} rounds",
        "",
        markdown(COLUMNS, [table_row(r) for r in [*references.values(), *results]]),
        "",
        *[conditions_line(r) for r in results],
    ]
    for res in results:
        local = references.get((res["K"], res["model"]))
        report += ["", "## " + comparison(res, peers, local), "", stage_table(res), "", cpu_table(res)]
    text = "\n".join(report) + "\n"
    print("\n" + text)
    (out / f"peerbench-{stamp}.md").write_text(text, encoding="utf-8")
    raw = {"fedsilo": results, "reference_this_host": list(references.values()), "argv": sys.argv}
    (out / f"peerbench-{stamp}.json").write_text(json.dumps(raw, indent=1), encoding="utf-8")
    print(f"written: {out / f'peerbench-{stamp}.md'} (+ .json with every round)")


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    main()
