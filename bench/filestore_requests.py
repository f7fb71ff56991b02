"""Small requests to the file store (issue 11): latency of HEAD, GET and PUT of a 200 KB blob, one client
alone and 10 clients at once, each client on its own keep-alive HTTPS connection.

    .venv/bin/python bench/filestore_requests.py [--requests 60] [--clients 1,10] [--kb 200]

Prints one table: per operation and client count, the median and 90th percentile of a request's latency
(ms) and the requests served per second by the store. Each PUT sends a new blob (no "already stored"
shortcut). The network runs on free ports (embedded broker, TLS on) through the package launcher, as the
tests do; `bench/machine.py` reports how much CPU other processes used meanwhile, and the load is printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import CpuMeter

from fedsilo.network.filestore_client import FileStoreClient
from fedsilo.network.launcher import NetworkHandle, start_network
from fedsilo.network.messages import BlobRef


def _operations(client: FileStoreClient, ref: BlobRef, kb: int) -> dict[str, Callable[[], object]]:
    return {
        "HEAD": lambda: client.exists(ref.key),
        f"GET {kb} KB": lambda: client.download_bytes(ref),
        f"PUT {kb} KB": lambda: client.upload_bytes(os.urandom(kb * 1000)),
    }


def run(net: NetworkHandle, op: str, clients: int, requests: int, ref: BlobRef, kb: int) -> tuple[list[float], float]:
    """Latencies (s) of `requests` calls of `op` per client, `clients` at once; and the wall time of all."""
    latencies: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def client_loop() -> None:
        with FileStoreClient(net.credentials("researcher").filestore) as client:
            call = _operations(client, ref, kb)[op]
            call()  # the connection is open (TLS handshake done) before the clock starts
            start.wait()
            mine = []
            for _ in range(requests):
                t0 = time.perf_counter()
                call()
                mine.append(time.perf_counter() - t0)
            with lock:
                latencies.extend(mine)

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return latencies, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=60, help="requests per client and row")
    parser.add_argument("--clients", default="1,10")
    parser.add_argument("--kb", type=int, default=200)
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as base:
        net = start_network(base, broker="embedded")
        try:
            with FileStoreClient(net.credentials("researcher").filestore) as client:
                ref = client.upload_bytes(os.urandom(args.kb * 1000))
                ops = list(_operations(client, ref, args.kb))
            meter = CpuMeter()
            meter.start()
            print("| request | clients | median ms | p90 ms | requests/s |")
            print("|---|---:|---:|---:|---:|")
            for op in ops:
                for clients in counts:
                    lat, wall = run(net, op, clients, args.requests, ref, args.kb)
                    p90 = statistics.quantiles(lat, n=10)[-1]
                    print(f"| {op} | {clients} | {1000 * statistics.median(lat):.1f} | {1000 * p90:.1f} | "
                          f"{len(lat) / wall:.0f} |", flush=True)  # fmt: skip
            foreign = meter.stop()
        finally:
            net.stop()
    if foreign is not None:
        print(f"other processes used {foreign:.0%} of the CPU meanwhile; load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
