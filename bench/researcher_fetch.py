"""The researcher's side of a large-model round alone (issue 11): updates downloaded, parsed, checked and folded
into FedAverage on the round's thread one after the other (as before), or on N download threads
(`researcher/fetch.py`) while the round's thread folds; and the round's preparation split in two.

    .venv/bin/python bench/researcher_fetch.py [--k 10] [--size-mb 40] [--threads 1,2,4] [--gaps 0,150]

K updates of `--size-mb` MB (a new blob each, stored before timing) "arrive" as replies `gap` ms apart (0: all
at once; 150: about how far apart K=10 large nodes' replies came in bench/run.py). Rows: `serial` (download +
checks + add for each reply before the next, the loop before issue 11) and `threads=N` (the Fetcher). Columns:
`tail s`: from the last reply's arrival to the last update folded (what the round's wall time pays after its
last node), and `total s`. Median over `--repeats`. Then `prepare`: `params_to_buffers` (serialise + sha256) of the
global model and its upload, timed apart (the round publishes its requests only once the upload is done).

A real network on free ports (embedded broker, the file store under uvicorn, TLS), as `bench/blobs.py`.
"""

from __future__ import annotations

import argparse
import queue
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from blobs import model_params
from machine import CpuMeter, wait_until_quiet

from fedsilo.common.config import Timeouts
from fedsilo.common.serialization import params_to_buffers
from fedsilo.network.filestore_client import FileStoreClient
from fedsilo.network.launcher import start_network
from fedsilo.network.messages import BlobRef, TrainReply
from fedsilo.researcher.algorithms.base import NodeUpdate
from fedsilo.researcher.algorithms.fedavg import FedAverage
from fedsilo.researcher.fetch import ClientPool, Fetched, Fetcher, UpdateLoader


def reply(i: int, ref: BlobRef) -> TrainReply:
    node = f"node-{i}"
    return TrainReply(sender=node, node_id=node, in_reply_to=f"r{i}", job_id="bench", round=0, dataset_id="d",
                      blobs={"params": ref}, sample_size=10 + i)  # fmt: skip


def one_round(replies: list[TrainReply], load: UpdateLoader, client: FileStoreClient, pool: ClientPool,
              global_params: dict, threads: int, gap_s: float) -> tuple[float, float]:  # fmt: skip
    """(tail s, total s) of one round's receive path; `threads` 0 = serial on the round's thread."""
    inbox: queue.Queue[TrainReply | Fetched] = queue.Queue()
    algorithm = FedAverage()
    algorithm.start_round(0, global_params)
    last_arrival: list[float] = []

    def arrive() -> None:
        for r in replies:
            inbox.put(r)
            last_arrival[:] = [time.perf_counter()]
            time.sleep(gap_s)

    def fold(r: TrainReply, blobs: dict) -> None:
        algorithm.add(NodeUpdate(r.node_id, blobs, r.sample_size))

    t0 = time.perf_counter()
    threading.Thread(target=arrive, daemon=True).start()
    folded = 0
    with Fetcher(load, inbox.put, max(threads, 1), pool, time.monotonic() + 600) as fetcher:  # type: ignore[arg-type]
        while folded < len(replies):
            msg = inbox.get()
            if isinstance(msg, Fetched):
                assert msg.error is None, msg.error
                fold(msg.reply, msg.blobs or {})
                fetcher.release()
                folded += 1
            elif threads == 0:
                fold(msg, load(client, msg))
                folded += 1
            else:
                fetcher.submit(msg.node_id, msg)
    end = time.perf_counter()
    algorithm.result()
    return end - last_arrival[0], end - t0


def prepare_split(client: FileStoreClient, size_mb: int, repeats: int) -> tuple[float, float]:
    serialise, upload = [], []
    for i in range(repeats):
        params = model_params(size_mb, seed=1000 + i)  # new bytes each time: no "already stored" shortcut
        t0 = time.perf_counter()
        blob = params_to_buffers(params)
        t1 = time.perf_counter()
        client.upload_bytes(blob)
        t2 = time.perf_counter()
        serialise.append(t1 - t0)
        upload.append(t2 - t1)
    return statistics.median(serialise), statistics.median(upload)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--size-mb", type=int, default=40)
    parser.add_argument("--threads", default="1,2,4", help="download threads to compare with serial")
    parser.add_argument("--gaps", default="0,150", help="ms between replies, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quiet-below", type=float, default=0.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.quiet_below > 0:
        wait_until_quiet(args.quiet_below, 120.0)
    with tempfile.TemporaryDirectory() as base:
        net = start_network(base, broker="embedded", max_upload_mb=args.size_mb + 64)
        try:
            settings = net.credentials("researcher").filestore
            with FileStoreClient(settings) as client:
                global_params = model_params(args.size_mb, seed=0)
                refs = [client.upload_bytes(params_to_buffers(model_params(args.size_mb, seed=1 + i)))
                        for i in range(args.k)]  # fmt: skip
                replies = [reply(i, ref) for i, ref in enumerate(refs)]
                load = UpdateLoader(global_params, max_bytes=2 * max(r.size for r in refs))
                pool = ClientPool(lambda t: FileStoreClient(settings, Timeouts()), Timeouts().transfer)  # as a round
                modes = [0] + [int(t) for t in args.threads.split(",")]
                meter = CpuMeter()
                meter.start()
                print(f"K={args.k} updates of {refs[0].size / 1e6:.1f} MB; median of {args.repeats}")
                print("| replies apart | receive path | tail s | total s |")
                print("|---|---|---|---|")
                for gap in [int(g) for g in args.gaps.split(",")]:
                    for threads in modes:
                        runs = [one_round(replies, load, client, pool, global_params, threads, gap / 1e3)
                                for _ in range(args.repeats)]  # fmt: skip
                        tail = statistics.median(r[0] for r in runs)
                        total = statistics.median(r[1] for r in runs)
                        name = "serial" if threads == 0 else f"threads={threads}"
                        print(f"| {gap} ms | {name} | {tail:.3f} | {total:.3f} |")
                serialise, upload = prepare_split(client, args.size_mb, args.repeats)
                print(f"\nprepare ({args.size_mb} MB global model): params_to_buffers {serialise:.3f} s, "
                      f"upload {upload:.3f} s")  # fmt: skip
                foreign = meter.stop()
                if foreign is not None:
                    print(f"other processes used {foreign:.0%} of the CPU meanwhile")
        finally:
            net.stop()


if __name__ == "__main__":
    main()
