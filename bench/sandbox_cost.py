"""What the worker's sandbox costs: bwrap around a Python start, and the per-round fork with confinement.

    .venv/bin/python bench/sandbox_cost.py [--runs 8]

Prints medians (min, max) and the load average; the numbers in `node/sandbox.py` come from this script.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from fedsilo.node.sandbox import bwrap_argv

FORK = """
import os, statistics, sys, time, torch
from fedsilo.node.sandbox_limits import SandboxLimits, confine
torch.set_num_threads(1)
model = torch.nn.Linear(2, 1); opt = torch.optim.Adam(model.parameters())
model(torch.zeros(1, 2)).sum().backward(); opt.step()
took = []
for _ in range(int(sys.argv[1])):
    t = time.perf_counter(); pid = os.fork()
    if pid == 0:
        confine(SandboxLimits()); torch.set_num_threads(1); os._exit(0)
    os.waitpid(pid, 0); took.append(time.perf_counter() - t)
print(" ".join(f"{x:.4f}" for x in took))
"""


def summary(values: list[float]) -> str:
    return f"median {statistics.median(values) * 1000:.0f} ms ({min(values) * 1000:.0f}-{max(values) * 1000:.0f})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=8)
    runs = parser.parse_args().runs
    home = tempfile.mkdtemp(prefix="fedsilo-bench-")
    data = os.path.join(home, "d.csv")
    open(data, "w").close()
    starts: dict[str, list[float]] = {"bwrap": [], "plain": []}
    for _ in range(runs):
        for mode in starts:
            cmd = [sys.executable, "-c", "pass"]
            argv = bwrap_argv(cmd, home, [data]) if mode == "bwrap" else cmd
            t = time.perf_counter()
            subprocess.run(argv, check=True)
            starts[mode].append(time.perf_counter() - t)
    out = subprocess.run(bwrap_argv([sys.executable, "-c", FORK, str(runs)], home, [data]), check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    forks = [float(x) for x in out.split()]
    print(f"python -c pass: in bwrap {summary(starts['bwrap'])}, without {summary(starts['plain'])}")
    print(f"per-round fork + confine + exit, in bwrap: {summary(forks)}")
    print(f"load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
