"""The daemon-worker frame path for a large blob, there and back over a socket pair: median seconds.

    .venv/bin/python bench/worker_wire.py [--mb 40] [--repeats 7]

Rows: `encode + send_bytes / recv_bytes + decode` (the path before issue 11's zero-copy frames: a joined frame,
multiprocessing's reads into a BytesIO, blobs sliced into new bytes) and `send_frame / recv_frame` (header
and blobs written from their own memory with writev, read into one buffer, blobs as views); each moves a
safetensors payload of `--mb` MB of float32 to a thread and the same bytes back, as a round does.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Pipe
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import CpuMeter

from fedsilo.common.serialization import params_to_buffers, params_to_bytes
from fedsilo.node.workerwire import decode, encode, recv_frame, send_frame


def joined(params: dict[str, torch.Tensor]) -> Callable[[], None]:
    a, b = Pipe()

    def echo() -> None:
        header, blobs = decode(b.recv_bytes())
        b.send_bytes(encode(header, blobs))

    def once() -> None:
        t = threading.Thread(target=echo)
        t.start()
        a.send_bytes(encode({"op": "task"}, {"params": params_to_bytes(params)}))
        decode(a.recv_bytes())
        t.join()

    return once


def zero_copy(params: dict[str, torch.Tensor]) -> Callable[[], None]:
    a, b = Pipe()

    def echo() -> None:
        header, blobs = recv_frame(b.fileno(), 1 << 34)
        send_frame(b.fileno(), header, blobs)

    def once() -> None:
        t = threading.Thread(target=echo)
        t.start()
        send_frame(a.fileno(), {"op": "task"}, {"params": params_to_buffers(params)})
        recv_frame(a.fileno(), 1 << 34)
        t.join()

    return once


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    params = {"w": torch.randn(args.mb * 250_000)}
    meter = CpuMeter()
    meter.start()
    rows = {}
    for label, make in (("encode + send_bytes / recv_bytes + decode", joined),
                        ("send_frame / recv_frame", zero_copy)):  # fmt: skip
        once = make(params)
        once()  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            once()
            times.append(time.perf_counter() - t0)
        rows[label] = statistics.median(times)
    foreign = meter.stop()
    print(f"{args.mb} MB blob there and back, median of {args.repeats}")
    print("| path | s | MB/s (both ways) |")
    print("|---|---:|---:|")
    for label, s in rows.items():
        print(f"| {label} | {s:.3f} | {2 * args.mb / s:,.0f} |")
    print(f"other processes used {foreign:.0%} of the CPU meanwhile" if foreign is not None else "")


if __name__ == "__main__":
    main()
