"""What a large file costs to write when its pages stay cached, against `release_page_cache` after each write.

    .venv/bin/python bench/page_cache.py                      # 40 MB files, every 1.5 s, 8 of each
    .venv/bin/python bench/page_cache.py --mb 40 --gap 5 --files 8

The researcher writes each round's global model to a new file (`researcher/rounds.py`). Left in the page cache,
every file takes pages the machine has not used since boot, and on a VM whose hypervisor reclaims freed guest
memory each such page costs a host fault on first touch. With `fdatasync` + `POSIX_FADV_DONTNEED` after the write
(`release_page_cache`) the next file gets the pages the last one gave back. For each way, `--files` files of
`--mb` MB, one every `--gap` seconds (a round's pace), in a folder under `--dir`: the median write's wall and
CPU seconds, and the wait for the disk that `fdatasync` adds. One table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path
from statistics import median

from fedsilo.researcher.rounds import release_page_cache

REPO = Path(__file__).resolve().parents[1]


def write_files(folder: Path, data: bytes, files: int, gap: float, release: bool) -> list[tuple[float, float, float]]:
    """(write wall s, write CPU s, fdatasync wait s) per file."""
    out = []
    for i in range(files):
        path = folder / f"{'released' if release else 'cached'}-{i}.bin"
        wall, cpu = time.perf_counter(), time.process_time()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            written_wall, written_cpu = time.perf_counter() - wall, time.process_time() - cpu
            synced = time.perf_counter()
            if release:
                release_page_cache(fd)
            out.append((written_wall, written_cpu, time.perf_counter() - synced))
        finally:
            os.close(fd)
        time.sleep(gap)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=40)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--gap", type=float, default=1.5, help="seconds between files")
    parser.add_argument("--dir", default=str(REPO / "run" / "bench-page-cache"))
    args = parser.parse_args()
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    data = os.urandom(args.mb << 20)
    try:
        rows = {release: write_files(folder, data, args.files, args.gap, release) for release in (False, True)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"| {args.mb} MB, one every {args.gap} s, {args.files} each | write wall s | write CPU s | fdatasync s |")
    print("|---|---|---|---|")
    for release, name in ((False, "left in the page cache"), (True, "released after each write")):
        walls, cpus, syncs = zip(*rows[release], strict=True)
        sync = f"{median(syncs):.4f}" if release else "-"
        print(f"| {name} | {median(walls):.4f} | {median(cpus):.4f} | {sync} |")


if __name__ == "__main__":
    main()
