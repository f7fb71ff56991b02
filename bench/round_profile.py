"""Where a fedsilo round goes: the nodes' stage timings (the replies' `timings`) and the researcher's, medians.

    .venv/bin/python bench/round_profile.py --k 3 --model small --rounds 6

The same federation as `bench/run.py` (K daemons as processes, sandboxed warm workers, the peerbench-v1
plan); one untimed round, then `--rounds` timed ones. Prints one table: for each part of a round, the
median over rounds and nodes of its wall seconds, and its share of the median round wall. A node's parts
are the daemon's stages by name, `worker` (the exchange with the warm worker, the round's fork included)
and the worker's stages as `worker.<stage>` (nested in `worker`); the researcher's are `prepare_s`
(serialise and upload the global model, publish the requests), `wait_s`, `handle_s` (replies downloaded,
checked and folded in) and `aggregate_s`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))
from federation import federation, load_workload, timed_round

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--model", default="small", choices=["small", "large"])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--broker", default="auto", choices=["auto", "embedded", "mosquitto"])
    parser.add_argument("--workload", default=str(REPO / ".." / "shared" / "bench"))
    parser.add_argument("--dir", default=str(REPO / "run" / "bench-profile"))
    args = parser.parse_args()
    W = load_workload(Path(args.workload))
    with federation(W, args.k, args.model, Path(args.dir), broker=args.broker, threads=1,
                    rounds=args.rounds + 1) as fed:  # fmt: skip
        timed_round(fed.exp, "warm-up")
        rounds = [timed_round(fed.exp, f"K={args.k}") for _ in range(args.rounds)]
    walls = [r.wall_s for r in rounds]
    wall = median(walls)
    node_parts: dict[str, list[float]] = {}
    for r in rounds:
        for reply in r.replies.values():
            for key, value in (reply.get("timings") or {}).items():
                node_parts.setdefault(key, []).append(value)
    researcher = {k: [float(r.stats[k]) for r in rounds if k in r.stats] for k in ("prepare_s", "wait_s", "handle_s",
                                                                                    "aggregate_s")}  # fmt: skip
    print(f"K={args.k} {args.model}: round wall median {wall:.4f} s (min {min(walls):.4f}, max {max(walls):.4f}), "
          f"{args.rounds} rounds; foreign CPU {median(r.foreign_cpu or 0 for r in rounds):.0%}")  # fmt: skip
    print("| part | median s | share of the round |")
    print("|---|---|---|")
    for key, values in [*(("researcher " + k, v) for k, v in researcher.items()), *sorted(node_parts.items())]:
        if values:
            print(f"| {key} | {median(values):.4f} | {median(values) / wall:.0%} |")


if __name__ == "__main__":
    main()
