"""Secure aggregation's overhead against plain FedAvg on the peerbench-v1 workload (small model, K=3 and K=10).

One federation per K (node daemons as processes, `bench/federation.py`); its rounds alternate plain and secure
(`Experiment(secure_aggregation=True)` semantics, switched on the same experiment), so both kinds see the same
machine load. Per round: wall time, the researcher's secure-aggregation stages (prepare = keys + shares,
unmask), bytes written to the file store (blob folder growth: the global model plus K updates) and MQTT bytes
the researcher published plus the stage replies it received.

    .venv/bin/python bench/secagg.py --rounds 6            # prints a table, writes bench/results/secagg-*.json
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path
from statistics import median
from typing import Any

import federation as bench_federation
from federation import federation, load_workload

REPO = Path(__file__).resolve().parents[1]


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class MqttCounter:
    """Bytes the researcher publishes, and the stage replies it collects (patched around one process's classes)."""

    def __init__(self) -> None:
        from fedsilo.researcher.connection import Connection
        from fedsilo.researcher.requests import Requests

        self.sent = 0
        self.received = 0
        publish, collect = Connection.publish, Requests.collect

        def counted_publish(conn, topic, message):
            self.sent += len(message.to_json())
            return publish(conn, topic, message)

        def counted_collect(req, request, *a, **kw):
            got = collect(req, request, *a, **kw)
            self.received += sum(len(r.to_json()) for r in got.replies.values())
            return got

        Connection.publish, Requests.collect = counted_publish, counted_collect  # type: ignore[method-assign]


def _nodes_without_sandbox() -> None:
    """`node init` followed by `[node] sandbox = "off"`: the peerbench plan imports `workload` from PYTHONPATH,
    which the bwrap sandbox does not bind (node/sandbox.py `python_paths`). Secure aggregation's work is in the
    daemon and the researcher, not in the worker, so the sandbox does not change what this measures."""
    from fedsilo.node.config import NodeConfig

    init = bench_federation.fedsilo_cli

    def cli(*args: str) -> str:
        out = init(*args)
        if args[:2] == ("node", "init"):
            cfg = NodeConfig.load(Path(args[args.index("--dir") + 1]))
            cfg.node.sandbox = "off"
            cfg.save()
        return out

    bench_federation.fedsilo_cli = cli


def run_k(W: Any, k: int, rounds: int, base: Path, broker: str) -> list[dict[str, Any]]:
    from fedsilo.researcher.secagg import SecureAggregation

    counter = MqttCounter()
    records = []
    with federation(W, k, "small", base / f"k{k}", broker=broker, threads=1, rounds=2 * rounds + 1) as fed:
        exp, blobs = fed.exp, base / f"k{k}" / "network" / "filestore" / "blobs"
        exp.run_once()  # warm-up round (first imports, first plan download), not timed
        for i in range(2 * rounds):
            secure = i % 2 == 1
            exp._secagg = SecureAggregation() if secure else None  # bench only: one experiment, both modes
            before_bytes, before_sent, before_recv = _dir_bytes(blobs), counter.sent, counter.received
            done = bench_federation.timed_round(exp, f"K={k}")
            wall, foreign, stats, replies = done.wall_s, done.foreign_cpu, done.stats, done.replies
            mask_s = [v["applied_caps"].get("secure_aggregation", {}).get("mask_s", 0.0) for v in replies.values()]
            records.append({"K": k, "secure": secure, "wall_s": wall, "prepare_s": stats.get("secagg_prepare_s", 0.0),
                            "unmask_s": stats.get("secagg_unmask_s", 0.0), "node_mask_s": median(mask_s),
                            "filestore_bytes": _dir_bytes(blobs) - before_bytes,
                            "mqtt_bytes": counter.sent - before_sent + counter.received - before_recv,
                            "foreign_cpu": foreign})  # fmt: skip
        records.append({"K": k, "params": W.num_params(W.build_model("small"))})
    return records


def table(records: list[dict[str, Any]]) -> str:
    rows = ["| K | mode | round wall median s | prepare s | unmask s | node mask s | file-store bytes/round | "
            "MQTT bytes/round |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for k in sorted({r["K"] for r in records}):
        for secure in (False, True):
            rs = [r for r in records if r["K"] == k and r.get("secure") is secure]
            if not rs:
                continue

            def med(key: str, rs: list[dict[str, Any]] = rs) -> float:
                return median(r[key] for r in rs)

            rows.append(f"| {k} | {'secure' if secure else 'plain'} | {med('wall_s'):.3f} | {med('prepare_s'):.3f} | "
                        f"{med('unmask_s'):.3f} | {med('node_mask_s'):.4f} | {med('filestore_bytes'):,.0f} | "
                        f"{med('mqtt_bytes'):,.0f} |")  # fmt: skip
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds of each mode per K")
    parser.add_argument("--k", type=int, action="append", help="node counts (default 3 and 10)")
    parser.add_argument("--broker", default="mosquitto", choices=["mosquitto", "embedded"])
    parser.add_argument("--dir", default="/tmp/fedsilo-bench-secagg")
    parser.add_argument("--workload", default=str(REPO / ".." / "shared" / "bench"))
    args = parser.parse_args()
    W = load_workload(Path(args.workload))
    _nodes_without_sandbox()
    records: list[dict[str, Any]] = []
    for k in args.k or [3, 10]:
        records += run_k(W, k, args.rounds, Path(args.dir), args.broker)
    print(table(records))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = REPO / "bench" / "results" / f"secagg-{stamp}.json"
    out.write_text(json.dumps({"records": records, "broker": args.broker}, indent=2), encoding="utf-8")
    print(f"written {out}")


if __name__ == "__main__":
    main()
