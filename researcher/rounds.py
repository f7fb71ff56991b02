"""Each round's global model: the current one in memory, earlier ones as safetensors on disk.

Layout: `<experiment folder>/rounds/round_NNNN.safetensors`, NNNN the 0-based round index, one
file a round, written once when the round completes. Holding every round in memory made the
researcher grow by one model a round (10M parameters: 38 MiB a round, 509 -> 816 MiB over 10
rounds); on disk a round costs nothing until it is read.

The file is written by one background thread while the next round runs: serialising and writing
the 10M-parameter model takes 0.17 s here (0.05 s safetensors, 0.12 s write), 2-6 % of a
large-model round that the round itself need not wait for (bench/RESULTS.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import re
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from fedsilo.common.errors import FedsiloError, SerializationError
from fedsilo.common.hashing import BLOB_DIGEST, blob_key, key_matches
from fedsilo.common.serialization import params_from_bytes, params_to_buffers

log = logging.getLogger(__name__)

Params = dict[str, torch.Tensor]
ROUNDS_DIR = "rounds"
_FILE_RE = re.compile(r"^round_(\d{4,})\.safetensors$")
RECYCLE_BYTES = 4 << 20
"""Files from this size on leave the page cache once on disk (`release_page_cache`); a smaller file's pages cost
little, and its `fdatasync` would only add a wait."""


class RoundArchiveError(FedsiloError):
    """A saved round is missing, altered or unreadable."""


def round_file(folder: Path, round_index: int) -> Path:
    return folder / f"round_{round_index:04d}.safetensors"


class RoundArchive:
    """The global model after each round: the latest in memory, every earlier one read from disk on demand.

    `folder` is fixed when the archive is made (or, given as a callable, at the first write), so a
    later change of the experimentation folder does not hide the rounds already written.
    `hashes` (round -> digest of its file, as a blob key: `blake3-<hex>`, or the sha256 hex a breakpoint from
    before BLAKE3 recorded) come from a breakpoint; reads are checked against them.
    """

    def __init__(
        self,
        folder: Path | None = None,
        current: tuple[int, Params] | None = None,
        hashes: Mapping[int, str] | None = None,
    ) -> None:
        self._folder = folder
        self._current = current
        self._hashes: dict[int, str] = dict(hashes or {})
        self._failed: dict[int, str] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._pending: tuple[int, Future[str]] | None = None

    # ------------------------------------------------------------------ writing
    def put(self, round_index: int, params: Params, folder: Path) -> None:
        """Make `params` the current round's model and write it to `folder` (the first call fixes it)."""
        self.flush()  # one write in flight at most: at most one extra serialised model in memory
        release_free_heap()
        if self._folder is None:
            self._folder = folder
        self._current = (round_index, params)
        self._hashes.pop(round_index, None)
        self._failed.pop(round_index, None)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedsilo-rounds")
        self._pending = (round_index, self._pool.submit(_write, self._folder, round_index, params))

    def flush(self) -> None:
        """Wait for the write in flight. A failed write is logged: that round stays readable only while current."""
        if self._pending is None:
            return
        round_index, future = self._pending
        self._pending = None
        try:
            self._hashes[round_index] = future.result()
        except Exception as exc:  # disk full, folder removed...: training goes on, the archive says why
            self._failed[round_index] = f"{type(exc).__name__}: {exc}"
            log.error("round %d's global model could not be saved under %s: %s", round_index, self._folder, exc)

    def close(self) -> None:
        self.flush()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def saved(self, round_index: int, params: Params) -> tuple[Path, str] | None:
        """(file, digest key) of `round_index` once written, if `params` is the very dict it was written from
        (a breakpoint then links that file instead of writing the same bytes again); else None."""
        self.flush()
        if self._current is None or self._current[0] != round_index or self._current[1] is not params:
            return None
        key = self._hashes.get(round_index)
        if key is None or self._folder is None:
            return None
        return round_file(self._folder, round_index), key

    # ------------------------------------------------------------------ reading
    @property
    def folder(self) -> Path | None:
        return self._folder

    def current_round(self) -> int | None:
        return None if self._current is None else self._current[0]

    def hashes(self) -> dict[int, str]:
        """Round -> digest of its file (a blob key), for the rounds written so far (kept in breakpoints)."""
        self.flush()
        return dict(self._hashes)

    def rounds(self) -> list[int]:
        """Rounds that can be read: those on disk up to the current one, and the current one.

        Files past the current round are ignored: they belong to rounds run after the breakpoint
        this experiment was resumed from, and will be overwritten when those rounds run again."""
        if self._current is None:
            return []
        last = self._current[0]
        found = {last}
        if self._folder is not None and self._folder.is_dir():
            for entry in os.scandir(self._folder):
                m = _FILE_RE.match(entry.name)
                if m and int(m.group(1)) < last and int(m.group(1)) not in self._failed:
                    found.add(int(m.group(1)))
        return sorted(found)

    def get(self, round_index: int) -> Params:
        """The global parameters after `round_index`; earlier rounds are read from disk on each call."""
        if self._current is not None and round_index == self._current[0]:
            return dict(self._current[1])
        if self._current is None or not 0 <= round_index < self._current[0]:
            raise KeyError(round_index)
        if self._pending is not None and self._pending[0] == round_index:
            self.flush()
        if round_index in self._failed:
            raise RoundArchiveError(f"round {round_index} was not saved: {self._failed[round_index]}")
        if self._folder is None:
            raise KeyError(round_index)
        path = round_file(self._folder, round_index)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            raise KeyError(round_index) from None
        expected = self._hashes.get(round_index)
        if round_index in self._hashes and not key_matches(expected, blob):  # a null record is refused too
            raise RoundArchiveError(f"{path}: contents differ from the digest recorded when it was written, "
                                    f"{str(expected)[:80]!r}")  # fmt: skip
        try:
            return params_from_bytes(blob)
        except SerializationError as exc:
            raise RoundArchiveError(f"{path}: {exc}") from None

    def view(self) -> AggregatedParams:
        return AggregatedParams(self, self.rounds())


class AggregatedParams(Mapping[int, dict[str, Params]]):
    """Round -> {"params": global parameters after that round}, read lazily.

    Index it (`agg[3]["params"]`), iterate it, `len()` it, `in` it like the dict it replaces. The
    current round comes from memory; each access to an earlier round reads its file again, so
    nothing is kept: hold on to what you index if you need it twice.
    """

    def __init__(self, archive: RoundArchive, rounds: list[int]) -> None:
        self._archive = archive
        self._rounds = rounds

    def __getitem__(self, round_index: int) -> dict[str, Params]:
        if round_index not in self._rounds:
            raise KeyError(round_index)
        return {"params": self._archive.get(round_index)}

    def __iter__(self) -> Iterator[int]:
        return iter(self._rounds)

    def __len__(self) -> int:
        return len(self._rounds)

    def __contains__(self, round_index: object) -> bool:
        return round_index in self._rounds

    def __repr__(self) -> str:
        if not self._rounds:
            return "AggregatedParams({})"
        where = self._archive.folder or "memory"
        return f"AggregatedParams(rounds {self._rounds[0]}..{self._rounds[-1]}, {len(self._rounds)} in all; {where})"


def _load_malloc_trim() -> object | None:
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


_MALLOC_TRIM = _load_malloc_trim()


def release_free_heap() -> None:
    """Give the heap memory freed by the round back to the system (glibc's `malloc_trim`; a no-op elsewhere).

    A round allocates and frees about K+3 models (downloads, parsed updates, float64 sums). glibc raises
    its mmap threshold to the size of a freed block (up to 32 MiB), so after round 1 the 20 MiB
    tensors of the 10M-parameter model come from the heap, and freed heap stays resident: with 10
    nodes RSS went 529 -> 725 MiB over 9 rounds (22 % spread over 30) with nothing referencing it.
    Trimming once a round (under 1 ms) kept a loop of the same allocations at 499-500 MiB from round 2 on."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _write(folder: Path, round_index: int, params: Params) -> str:
    """Write one round atomically (temporary file renamed into place) from the tensors' memory; returns its
    digest as a blob key (BLAKE3, as blobs are named: `common.hashing`). Measured (40 MB, idle 2-core machine,
    2026-11-30): 0.22-0.30 s through one joined copy, 0.18-0.19 s written from the tensors (the thread runs while
    the next round does). Its sha256 took 0.037 CPU s of that, BLAKE3 takes 0.009 s (40 MB, 2026-12-02)."""
    folder.mkdir(parents=True, exist_ok=True)
    final = round_file(folder, round_index)
    tmp = final.with_name(f".{final.name}.tmp")
    key = write_params(params, tmp)
    os.replace(tmp, final)
    return key


def write_params(params: Params, path: Path) -> str:
    """`params` as safetensors at `path`, written from the tensors' memory; its digest key (BLAKE3, as blobs are
    named). The round archive's files and a breakpoint's are written by this one function: the same parameters
    make the same bytes, which is what lets a breakpoint link an archived round."""
    payload = params_to_buffers(params)
    with open(path, "wb") as f:
        f.writelines(payload.buffers)
        if f.tell() >= RECYCLE_BYTES:
            f.flush()
            release_page_cache(f.fileno())
    return blob_key(BLOB_DIGEST, payload.digest(BLOB_DIGEST))


def release_page_cache(fd: int) -> None:
    """Write the file's pages to disk, then hand them back to the kernel, which gives them to the next write.

    A round's file is read again only if someone asks for that round, but its pages stayed cached, so every round's
    file took pages the guest had never touched, and on this VM (as on any whose hypervisor reclaims freed guest
    memory) a fresh page costs a host fault. Measured (40 MB written to a new file every 1.5 s, 2-core VM, 2026-12-02):
    0.10-0.13 CPU s a file left cached, 0.015-0.018 CPU s with `fdatasync` + `POSIX_FADV_DONTNEED` after each (the
    next file reuses the pages), plus 0.015 s waiting on the disk; a machine-wide `perf` of K=3 large rounds put
    the archive's writes at 4.3 % of all CPU. The `fdatasync` also makes the rename that follows crash-safe."""
    os.fdatasync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
