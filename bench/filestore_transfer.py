"""Large-blob throughput of the file store: upload and download of one 40 MB blob, median of 5.

    .venv/bin/python bench/filestore_transfer.py [--mb 40] [--repeats 5]

Starts a network on free ports (embedded broker) through the package launcher, as the tests do.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from fedsilo.network.filestore_client import FileStoreClient
from fedsilo.network.launcher import start_network


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as base:
        net = start_network(base, broker="embedded", max_upload_mb=max(64, 2 * args.mb))
        try:
            with FileStoreClient(net.credentials("researcher").filestore) as client:
                ups, downs = [], []
                for _ in range(args.repeats):
                    data = os.urandom(args.mb * 1_000_000)  # a new blob each time: no "already stored" shortcut
                    t0 = time.perf_counter()
                    ref = client.upload_bytes(data)
                    t1 = time.perf_counter()
                    assert client.download_bytes(ref) == data
                    t2 = time.perf_counter()
                    ups.append(t1 - t0)
                    downs.append(t2 - t1)
        finally:
            net.stop()
    up, down = statistics.median(ups), statistics.median(downs)
    print(f"{args.mb} MB blob, median of {args.repeats}: upload {up:.3f} s ({args.mb / up:.0f} MB/s), "
          f"download {down:.3f} s ({args.mb / down:.0f} MB/s)")


if __name__ == "__main__":
    main()
