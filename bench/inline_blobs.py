"""Small blobs inline in the messages against the file-store round trip (issue 11): A/B in one sitting.

    git worktree add --detach /tmp/ab/before/fedsilo HEAD      # then, in it: git revert --no-commit <inline commits>
    git worktree add --detach /tmp/ab/after/fedsilo HEAD
    .venv/bin/python bench/inline_blobs.py --k 3 10 --rounds 8 --before /tmp/ab/before/fedsilo \
        --after /tmp/ab/after/fedsilo

The same federation as `bench/round_profile.py` (K daemons as processes, sandboxed warm workers, the
peerbench-v1 small model: 50,552 float32 parameters, 202,400 bytes). For each K it runs the code of `--before`
and `--after` (checkouts in folders named `fedsilo`, imported through PYTHONPATH=their parent: the node's sandbox
binds a package's real folder at its real path, so a symlink would not do; without `--after`, this checkout),
alternating `--sittings` times, one untimed round then `--rounds` timed ones each, and prints one table of
medians: round wall, the researcher's prepare_s (serialise + upload the model + publish) and handle_s (replies
downloaded and folded), each node's load_params (download + parse) and upload, the file store's CPU per round
(/proc/<filestore pid>/stat) and the blobs it stored per round. `foreign` is the CPU share of other processes.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parents[1]
PARTS = ("wall_s", "prepare_s", "handle_s", "load_params", "upload", "store_cpu_s", "stored", "foreign")


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _blobs(netdir: Path) -> int:
    db = sqlite3.connect(netdir / "filestore" / "db.sqlite3")
    try:
        return int(db.execute("SELECT count(*) FROM filestore_blob").fetchone()[0])
    finally:
        db.close()


def measure(k: int, rounds: int, base: Path, workload: Path) -> dict[str, float]:
    """One sitting with the fedsilo this interpreter imports: the medians of PARTS."""
    from federation import federation, load_workload, timed_round

    W = load_workload(workload)
    with federation(W, k, "small", base, broker="auto", threads=1, rounds=rounds + 1) as fed:
        timed_round(fed.exp, "warm-up")
        pid = json.loads((fed.netdir / "state.json").read_text())["filestore_pid"]
        rows: dict[str, list[float]] = {p: [] for p in PARTS}
        for _ in range(rounds):
            cpu0, blobs0 = _cpu_s(pid), _blobs(fed.netdir)
            r = timed_round(fed.exp, f"K={k}")
            rows["store_cpu_s"].append(_cpu_s(pid) - cpu0)
            rows["stored"].append(_blobs(fed.netdir) - blobs0)
            rows["wall_s"].append(r.wall_s)
            rows["foreign"].append(r.foreign_cpu or 0.0)
            rows["prepare_s"].append(r.stats["prepare_s"])
            rows["handle_s"].append(r.stats["handle_s"])
            for reply in r.replies.values():
                rows["load_params"].append(reply["timings"].get("load_params", 0.0))
                rows["upload"].append(reply["timings"].get("upload", 0.0))
    return {p: median(v) for p, v in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--sittings", type=int, default=2)
    parser.add_argument("--before", type=Path, help="a checkout (folder named fedsilo) before inline blobs")
    parser.add_argument("--after", type=Path, help="a checkout (folder named fedsilo) with them; default: this one")
    parser.add_argument("--workload", type=Path, default=REPO / ".." / "shared" / "bench")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "bench-inline")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # "K": a child measures one sitting, prints JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(int(args.one), args.rounds, args.dir, args.workload)))
        return
    trees = {"before": args.before, "after": args.after}
    for tree in filter(None, trees.values()):
        if tree.name != "fedsilo" or not (tree / "network" / "message_base.py").is_file():
            parser.error(f"{tree}: give a fedsilo checkout in a folder named 'fedsilo'")
    print(f"load before: {os.getloadavg()[0]:.2f}")
    print("| K | code | " + " | ".join(PARTS) + " | load |")
    print("|---|---|" + "---|" * (len(PARTS) + 1))
    for k in args.k:
        for sitting in range(args.sittings):
            for label in (["before"] if args.before else []) + ["after"]:
                tree = trees[label]
                env = {**os.environ, "PYTHONPATH": str(tree.resolve().parent)} if tree else dict(os.environ)
                done = subprocess.run([sys.executable, __file__, "--one", str(k), "--rounds", str(args.rounds),
                                       "--workload", str(args.workload), "--dir", str(args.dir / f"k{k}-{label}")],
                                      env=env, capture_output=True, text=True, check=True)  # fmt: skip
                m = json.loads(done.stdout.strip().splitlines()[-1])
                cells = " | ".join(f"{m[p]:.4f}" if p not in ("stored", "foreign") else f"{m[p]:.2f}" for p in PARTS)
                print(f"| {k} | {label} {sitting + 1} | {cells} | {os.getloadavg()[0]:.1f} |", flush=True)
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
