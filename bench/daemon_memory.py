"""A node daemon's own memory, apart from its worker: PSS and USS (private) of the daemon process and of the
processes under it (bwrap, the warm worker), after warm-up rounds, and whether torch is mapped in the daemon.

    .venv/bin/python bench/daemon_memory.py --k 3 --rounds 2

The same federation as `bench/run.py` (K daemons as processes, sandboxed warm workers, the peerbench-v1 small
plan). Prints one table, MiB, medians over the K nodes. Issue 11's scaling goal (K = 50 on one 23 GiB machine)
is a question of each node's private memory: the daemon's is what this measures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))
from federation import federation, load_workload, timed_round
from scaling import daemon_process, memory_mib

REPO = Path(__file__).resolve().parents[1]


def daemon_memory(nodedir: Path) -> dict[str, float]:
    """MiB: the daemon's PSS and USS, its children's together, and 1.0 when libtorch is mapped in the daemon."""
    daemon = daemon_process(nodedir)
    own, kids = memory_mib([daemon]), memory_mib(daemon.children(recursive=True))
    maps = Path(f"/proc/{daemon.pid}/maps").read_text()
    return {"daemon_pss": own["pss"], "daemon_uss": own["uss"], "children_pss": kids["pss"],
            "children_uss": kids["uss"], "torch_mapped": float("libtorch" in maps)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--broker", default="auto", choices=["auto", "embedded", "mosquitto"])
    parser.add_argument("--workload", default=str(REPO / ".." / "shared" / "bench"))
    parser.add_argument("--dir", default=str(REPO / "run" / "bench-daemon-memory"))
    args = parser.parse_args()
    W = load_workload(Path(args.workload))
    with federation(W, args.k, "small", Path(args.dir), broker=args.broker, threads=1,
                    rounds=args.rounds) as fed:  # fmt: skip
        for i in range(args.rounds):
            timed_round(fed.exp, f"warm-up {i}")
        rows = [daemon_memory(d) for d in fed.nodedirs]
    print(f"K={args.k}, after {args.rounds} round(s); MiB, median over nodes")
    print("| daemon PSS | daemon USS | worker+bwrap PSS | worker+bwrap USS | libtorch mapped in the daemon |")
    print("|---|---|---|---|---|")
    med = {key: median(r[key] for r in rows) for key in rows[0]}
    print(f"| {med['daemon_pss']:.1f} | {med['daemon_uss']:.1f} | {med['children_pss']:.1f} | "
          f"{med['children_uss']:.1f} | {sum(r['torch_mapped'] for r in rows):.0f} of {len(rows)} |")


if __name__ == "__main__":
    main()
