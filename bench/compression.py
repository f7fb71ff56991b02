"""Update compression (issue 11) on the peerbench-v1 workload: bytes per round, round time and final accuracy
with each codec, against plain float32 updates, on one federation per configuration (node daemons as
processes, `bench/federation.py`).

Per configuration: one warm-up round (first plan download, first imports), then for each codec a fresh
`Experiment` (a new job: the nodes start with empty error-feedback residuals) from the workload's initial
model, `--rounds` rounds. Per round: the wall time around `run_once()`, the bytes of the nodes' update blobs
(`round_stats()["bytes_up"]`: what a codec shrinks) and of the global model sent (`bytes_down`), the nodes'
median encode time (`applied_caps.compression.encode_s`) and upload time; then the final model's accuracy on
the workload's test set. Medians leave out each experiment's first round.

    .venv/bin/python bench/compression.py                          # K=3 small
    .venv/bin/python bench/compression.py --config 3:large --rounds 3
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
CODECS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "float16": {"codec": "float16"},
    "int8": {"codec": "int8"},
    "topk 1%": {"codec": "topk", "fraction": 0.01},
}


def run_config(W: Any, k: int, size: str, rounds: int, base: Path, broker: str) -> list[dict[str, Any]]:
    from fedsilo.researcher.compression import compression_setting

    records: list[dict[str, Any]] = []
    with federation(W, k, size, base / f"k{k}-{size}", broker=broker, threads=1, rounds=rounds) as fed:
        fed.exp.run_once()  # warm-up: the nodes fetch and cache the plan, the worker's first round
        for label, codec in CODECS.items():
            exp = bench_federation.make_experiment(W, fed.plan, k, size, fed.netdir, base / "experiments", rounds)
            exp._compression = compression_setting(codec)  # what Experiment(compression=codec) sets
            with exp:
                for _ in range(rounds):
                    done = bench_federation.timed_round(exp, f"{label} K={k} {size}")
                    r, wall, foreign = done.round, done.wall_s, done.foreign_cpu
                    stats, replies = done.stats, done.replies
                    caps = [v["applied_caps"].get("compression", {}) for v in replies.values()]
                    records.append({"K": k, "model": size, "codec": label, "round": r, "wall_s": wall,
                                    "bytes_up": stats["bytes_up"], "bytes_down": stats["bytes_down"],
                                    "encode_s": median(c.get("encode_s", 0.0) for c in caps),
                                    "upload_s": median(v["timings"].get("upload_s", 0.0) for v in replies.values()),
                                    "foreign_cpu": foreign})  # fmt: skip
                final = W.evaluate(exp.training_plan().model(), *W.make_test_data())
                records.append({"K": k, "model": size, "codec": label, "final_accuracy": final["accuracy"]})
    return records


def table(records: list[dict[str, Any]]) -> str:
    rows = ["| K | model | codec | update bytes/round | vs none | round wall median s | node encode s | "
            "node upload s | final acc |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for k, size in sorted({(r["K"], r["model"]) for r in records}):
        plain = None
        for label in CODECS:
            rs = [r for r in records if (r["K"], r["model"], r["codec"]) == (k, size, label) and "wall_s" in r]
            timed = [r for r in rs if r["round"] > 0] or rs
            if not rs:
                continue
            acc = next(r["final_accuracy"] for r in records
                       if (r["K"], r["model"], r["codec"]) == (k, size, label) and "final_accuracy" in r)  # fmt: skip
            up = median(r["bytes_up"] for r in timed)
            plain = plain or up
            rows.append(f"| {k} | {size} | {label} | {up:,.0f} | {up / plain:.3f} | "
                        f"{median(r['wall_s'] for r in timed):.3f} | {median(r['encode_s'] for r in timed):.4f} | "
                        f"{median(r['upload_s'] for r in timed):.4f} | {acc:.4f} |")  # fmt: skip
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", help="K:model, e.g. 3:small (default) or 3:large")
    parser.add_argument("--rounds", type=int, default=10, help="rounds per codec (the workload's 10)")
    parser.add_argument("--broker", default="mosquitto", choices=["mosquitto", "embedded"])
    parser.add_argument("--dir", default="/tmp/fedsilo-bench-compression")
    parser.add_argument("--workload", default=str(REPO / ".." / "shared" / "bench"))
    args = parser.parse_args()
    W = load_workload(Path(args.workload))
    records: list[dict[str, Any]] = []
    for config in args.config or ["3:small"]:
        k, size = config.split(":")
        records += run_config(W, int(k), size, args.rounds, Path(args.dir), args.broker)
    print(table(records))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = REPO / "bench" / "results" / f"compression-{stamp}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"records": records, "broker": args.broker}, indent=2), encoding="utf-8")
    print(f"written {out}")


if __name__ == "__main__":
    main()
