"""The researcher's memory over a long run: RSS after every round of the peerbench workload.

    .venv/bin/python bench/memory.py                      # K=10 large, 30 rounds
    .venv/bin/python bench/memory.py --k 3 --rounds 10    # a shorter run

Nodes are processes, set up as in bench/run.py (`federation.py`). The researcher is this process:
after each `run_once()` its resident set size (`VmRSS`) and peak (`VmHWM`) are read from
/proc/self/status. RSS is "flat" when, from round 2 on (round 1 allocates what every round reuses),
its largest value is within `--tolerance` (5 %) of its smallest. Writes a table (stdout and
`<out>/memory-<time>.md`), every number (`.json`) and a plot (`.png`).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np
from federation import federation, load_workload
from machine import CpuMeter, wait_until_quiet

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20


def proc_status_kib(field: str) -> int:
    """A `kB` field of /proc/self/status (VmRSS: resident now, VmHWM: resident at its peak)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def archive_write_s(W: Any, size: str, folder: Path, repeats: int = 3) -> dict[str, float]:
    """What the researcher's round archive does once a round, off the round's path: serialise, write, rename."""
    from fedsilo.common.serialization import params_to_bytes

    params = {k: v.detach().clone() for k, v in W.build_model(size).state_dict().items()}
    ser, write = [], []
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        for i in range(repeats):
            t0 = time.perf_counter()
            blob = params_to_bytes(params)
            t1 = time.perf_counter()
            path = Path(tmp) / f"round_{i:04d}.safetensors"
            path.with_suffix(".tmp").write_bytes(blob)
            os.replace(path.with_suffix(".tmp"), path)
            write.append(time.perf_counter() - t1)
            ser.append(t1 - t0)
    return {"serialise_s": median(ser), "write_s": median(write), "bytes": len(blob)}


def verdict(rss_mib: list[float], tolerance: float) -> dict[str, Any]:
    """RSS from round 2 on: flat when no round rises more than `tolerance` above round 2 (growth is what
    a leak looks like; a round that reads lower is reported as the min-max spread, not counted as growth)."""
    steady = rss_mib[1:] or rss_mib
    low, high = min(steady), max(steady)
    slope = float(np.polyfit(np.arange(len(steady)), steady, 1)[0]) if len(steady) > 1 else 0.0
    return {
        "min_mib": low,
        "max_mib": high,
        "spread": (high - low) / low,
        "max_above_round2": (high - steady[0]) / steady[0],
        "growth_first_to_last": (steady[-1] - steady[0]) / steady[0],
        "slope_mib_per_round": slope,
        "flat": (high - steady[0]) / steady[0] <= tolerance,
        "tolerance": tolerance,
    }


def plot(records: list[dict[str, Any]], before_mib: float, res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in records]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(rounds, [r["rss_mib"] for r in records], marker="o", ms=3, label="RSS after the round")
    ax.plot(rounds, [r["peak_mib"] for r in records], ls="--", color="grey", label="peak RSS so far (VmHWM)")
    ax.axhline(before_mib, color="green", lw=0.8, label="before round 1")
    base = records[1]["rss_mib"] if len(records) > 1 else records[0]["rss_mib"]
    tol = res["verdict"]["tolerance"]
    ax.axhspan(base, base * (1 + tol), color="orange", alpha=0.15, label=f"round 2 to +{tol:.0%} (flat)")
    ax.set_xlabel("round")
    ax.set_ylabel("researcher RSS (MiB)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"researcher memory: K={res['K']} {res['model']} ({res['params']:,} parameters), {len(rounds)} rounds")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(res: dict[str, Any]) -> str:
    v, a = res["verdict"], res["archive"]
    rows = [
        f"| {r['round']} | {r['wall_s']:.2f} | {r['rss_mib']:.1f} | {r['peak_mib']:.1f} | {r['rounds_on_disk']} |"
        for r in res["rounds"]
    ]
    walls = [r["wall_s"] for r in res["rounds"]]
    foreign = res["conditions"]["foreign_cpu_share_during_rounds"]
    lines = [
        f"# researcher memory over {len(rows)} rounds ({res['stamp']})",
        "",
        f"K={res['K']} {res['model']} ({res['params']:,} parameters, {a['bytes'] / MIB:.1f} MiB as safetensors); "
        f"broker {res['broker']}; node threads {res['threads']}; set-up {res['setup_s']:.0f} s (untimed); "
        f"rounds {sum(walls):.0f} s in all, median {median(walls):.2f} s",
        "",
        f"RSS before round 1: {res['rss_before_mib']:.1f} MiB. From round 2 on: {v['min_mib']:.1f} to "
        f"{v['max_mib']:.1f} MiB (min-max spread {v['spread']:.1%}); "
        f"highest {v['max_above_round2']:+.1%} above round 2 (tolerance {v['tolerance']:.0%}), "
        f"round 2 -> last {v['growth_first_to_last']:+.1%}, slope {v['slope_mib_per_round']:+.2f} MiB/round: "
        + ("**flat**" if v["flat"] else "**NOT flat**"),
        "",
        f"Round archive (one file a round, written by a background thread while the next round runs): "
        f"serialise {1e3 * a['serialise_s']:.0f} ms + write {1e3 * a['write_s']:.0f} ms = "
        f"{(a['serialise_s'] + a['write_s']) / median(walls):.1%} of the median round wall.",
        "",
        "Machine: "
        + ("" if foreign is None else f"other processes used {foreign:.0%} of the CPU during the rounds; ")
        + "load average before "
        + ", ".join(f"{x:.2f}" for x in res["conditions"]["loadavg_before"]),
        "",
        "| round | wall s | RSS MiB | peak RSS MiB | rounds on disk |",
        "|---|---|---|---|---|",
        *rows,
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=10, help="number of clients (node daemons)")
    parser.add_argument("--model", default="large", choices=["small", "large"])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--tolerance", type=float, default=0.05, help="largest spread of RSS from round 2 on")
    parser.add_argument("--workload", default=str(REPO / ".." / "shared" / "bench"))
    parser.add_argument("--dir", default=str(REPO / "run" / "bench-memory"), help="working folder (wiped)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"), help="where results are written")
    parser.add_argument("--broker", default="auto", choices=["auto", "embedded", "mosquitto"])
    parser.add_argument("--threads", type=int, default=1, help="`fedsilo node init --threads`")
    parser.add_argument("--quiet-below", type=float, default=0.15, help="wait for a machine quieter than this")
    parser.add_argument("--quiet-wait", type=float, default=120.0)
    parser.add_argument("--from-json", help="only write the report and plot again from a run's .json")
    args = parser.parse_args()
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text(encoding="utf-8"))
        res["verdict"] = verdict([r["rss_mib"] for r in res["rounds"]], args.tolerance)
        Path(args.from_json).with_suffix(".md").write_text(report(res), encoding="utf-8")
        plot(res["rounds"], res["rss_before_mib"], res, Path(args.from_json).with_suffix(".png"))
        print(report(res))
        return

    W = load_workload(Path(args.workload))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    base = Path(args.dir) / f"k{args.k}-{args.model}"
    print(f"researcher memory: K={args.k} {args.model}, {args.rounds} rounds; working folder {base}", flush=True)
    quiet = wait_until_quiet(args.quiet_below, args.quiet_wait)
    load_before = os.getloadavg()
    records: list[dict[str, Any]] = []
    with federation(W, args.k, args.model, base, broker=args.broker, threads=args.threads, rounds=args.rounds) as fed:
        exp = fed.exp
        archive = archive_write_s(W, args.model, base)
        rss_before = proc_status_kib("VmRSS") / 1024
        print(f"set up in {fed.setup_s:.0f} s; RSS before round 1: {rss_before:.1f} MiB", flush=True)
        meter = CpuMeter()
        meter.start()
        for r in range(args.rounds):
            t0 = time.perf_counter()
            exp.run_once()
            wall = time.perf_counter() - t0
            rec = {
                "round": r + 1,
                "wall_s": wall,
                "rss_mib": proc_status_kib("VmRSS") / 1024,
                "peak_mib": proc_status_kib("VmHWM") / 1024,
                "rounds_on_disk": len(list((exp.experimentation_path() / "rounds").glob("round_*.safetensors"))),
                "researcher": exp.round_stats()[r],
            }
            records.append(rec)
            print(f"round {r + 1:3d}: {wall:6.2f} s  RSS {rec['rss_mib']:7.1f} MiB  peak {rec['peak_mib']:7.1f} MiB",
                  flush=True)  # fmt: skip
        foreign = meter.stop()
        dropped = {r: n for r, nodes in exp.training_replies().items() for n, v in nodes.items() if v.get("dropped")}
        if dropped:
            raise RuntimeError(f"nodes dropped out: {dropped}")
        if list(exp.aggregated_params()) != list(range(args.rounds)):
            raise RuntimeError(f"aggregated_params() holds rounds {list(exp.aggregated_params())}")
        params = sum(v.numel() for v in exp.training_plan().get_parameters().values())
        broker = fed.broker

    res = {
        "stamp": stamp,
        "K": args.k,
        "model": args.model,
        "params": params,
        "broker": broker,
        "threads": args.threads,
        "setup_s": fed.setup_s,
        "rss_before_mib": rss_before,
        "archive": archive,
        "rounds": records,
        "verdict": verdict([r["rss_mib"] for r in records], args.tolerance),
        "conditions": {
            "foreign_cpu_share_during_rounds": foreign,
            "cpu_s_by_component": meter.components,
            "foreign_cpu_share_before": quiet,
            "loadavg_before": load_before,
        },
    }
    text = report(res)
    print("\n" + text)
    (out / f"memory-{stamp}.md").write_text(text, encoding="utf-8")
    (out / f"memory-{stamp}.json").write_text(json.dumps(res, indent=1), encoding="utf-8")
    plot(records, rss_before, res, out / f"memory-{stamp}.png")
    print(f"written: {out / f'memory-{stamp}.md'} (+ .json, .png)")


if __name__ == "__main__":
    main()
