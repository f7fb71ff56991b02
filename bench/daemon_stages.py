"""The daemon's own work on one update, in-process: `protect` (parse, names/shapes/dtypes, finite), with DP
clipping, with clipping and noise, and `compress`'s encode per codec, on the peerbench-v1 large model
(10.1 M float32 parameters, 40 MB). Best of `--repeat`, seconds, one table.

    .venv/bin/python bench/daemon_stages.py --repeat 5
    PYTHONPATH=/path/to/an/older/tree .venv/bin/python bench/daemon_stages.py   # the same on older code

The daemon computes in numpy since it stopped importing torch (`common/arrays.py`); on a tree from before,
the same functions are timed with torch tensors as the received model (what its daemon held).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch

SHAPES = {"0.weight": (2240, 32), "0.bias": (2240,), "2.weight": (2240, 2240), "2.bias": (2240,),
          "4.weight": (2240, 2240), "4.bias": (2240,), "6.weight": (2, 2240), "6.bias": (2,)}  # fmt: skip
"""peerbench-v1's large MLP (32 -> 2240 -> 2240 -> 2240 -> 2): 10,118,082 parameters."""


def best(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    from fedsilo.common.codecs import Compression
    from fedsilo.common.codecs_update import encode_update
    from fedsilo.common.serialization import params_from_bytes, params_to_bytes
    from fedsilo.node import protection
    from fedsilo.node.config import DPPolicy
    from fedsilo.node.protection import protect_update

    if hasattr(protection, "arrays_from_bytes"):  # the numpy daemon: it holds arrays
        from fedsilo.common.arrays import arrays_from_bytes as parse

        kind = "numpy"
    else:  # before: torch tensors
        parse = params_from_bytes
        kind = "torch"
    g = torch.Generator().manual_seed(0)
    received_t = {n: torch.randn(s, generator=g) * 0.05 for n, s in SHAPES.items()}
    update_t = {n: t + 0.001 * torch.randn(t.shape, generator=g) for n, t in received_t.items()}
    received = parse(bytearray(params_to_bytes(received_t)), copy=False)
    blob = bytearray(params_to_bytes(update_t))
    rows = []
    for label, policy in (("protect: checks", DPPolicy()), ("protect: + clip", DPPolicy(update_clip=0.01)),
                          ("protect: + clip + noise", DPPolicy(update_clip=0.01, update_noise=1.0))):  # fmt: skip
        rows.append((label, best(lambda p=policy: protect_update({"params": blob}, received, p), args.repeat)))
    update = parse(blob, copy=False)
    for codec in ("float16", "int8", "topk"):
        spec = Compression(codec="topk", fraction=0.01) if codec == "topk" else Compression.of(codec)
        rows.append((f"compress: {codec} encode", best(lambda s=spec: encode_update(update, received, s).to_bytes(),
                                                        args.repeat)))  # fmt: skip
    load = os.getloadavg()[0]
    print(f"daemon stages on {kind}, 10.1 M float32 parameters, best of {args.repeat}; load {load:.1f}, "
          f"torch threads {torch.get_num_threads()}")
    print("| stage | seconds |")
    print("|---|---|")
    for label, s in rows:
        print(f"| {label} | {s:.3f} |")


if __name__ == "__main__":
    main()
