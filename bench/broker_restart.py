"""How long a network's broker (and file store) is down after a kill -9: time from the SIGKILL to the
restarted child accepting connections on the same port (TCP connect for the broker, a 200 from the
health check for the file store), as `NetworkHandle.kill_broker()` / `kill_filestore()` measure it.

    .venv/bin/python bench/broker_restart.py [--repeat 5] [--broker embedded --broker mosquitto]

Crashes are spaced by more than the supervisor's STABLE_S, so each one is a "first" crash (restarted
at once, no backoff); use --pause 0 to see the backoff instead.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time

from fedsilo.network.launcher import start_network
from fedsilo.network.supervisor import STABLE_S


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", action="append", choices=["embedded", "mosquitto"])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--pause", type=float, default=STABLE_S + 1, help="seconds between crashes")
    parser.add_argument("--filestore", action="store_true", help="also kill the file store")
    args = parser.parse_args()
    brokers = args.broker or ["embedded", *(["mosquitto"] if shutil.which("mosquitto") else [])]
    for broker in brokers:
        with tempfile.TemporaryDirectory(prefix=f"restart-{broker}-") as tmp:
            net = start_network(tmp, broker=broker)
            try:
                parts = [("broker", net.kill_broker)] + ([("file store", net.kill_filestore)] if args.filestore else [])
                for name, kill in parts:
                    times = []
                    for i in range(args.repeat):
                        if i:
                            time.sleep(args.pause)
                        times.append(kill())
                    print(
                        f"{broker:9s} {name:10s} back after kill -9: median {statistics.median(times):.3f} s, "
                        f"min {min(times):.3f}, max {max(times):.3f} (n={len(times)}: "
                        f"{', '.join(f'{t:.3f}' for t in times)})",
                        flush=True,
                    )
            finally:
                net.stop()


if __name__ == "__main__":
    main()
