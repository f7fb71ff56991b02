"""Retention: remove blobs that nobody uploaded, granted or read within the retention window.

A round uses its blobs within the round timeout (minutes), and every upload, grant and read
refreshes `Blob.last_used_at`, so a window of days (`retention_days`, at least an hour) never removes
a blob that an unfinished round needs. Run by `fedsilo network gc --dir NET` and by the running store
every `gc_interval_s`; both can run at once (each batch is one IMMEDIATE SQLite transaction).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from fedsilo.common.clitools import table
from fedsilo.common.hashing import is_sha256

log = logging.getLogger(__name__)

BATCH = 500
"""Blobs removed per transaction: uploads wait for the write lock at most one batch's unlinks."""
TMP_MAX_AGE_S = 3600.0
"""A temp file of an upload lives for the seconds its body takes to hash; older ones are crash leftovers."""


@dataclass
class GcReport:
    """What one collection removed (or would remove, on a dry run)."""

    retention_s: float
    dry_run: bool = False
    by_uploader: dict[str, list[int]] = field(default_factory=dict)  # party -> [blobs, bytes]
    leftovers: int = 0  # temp files and blob files without a row

    @property
    def count(self) -> int:
        return sum(n for n, _ in self.by_uploader.values())

    @property
    def bytes(self) -> int:
        return sum(b for _, b in self.by_uploader.values())

    def add(self, party: str, size: int) -> None:
        row = self.by_uploader.setdefault(party, [0, 0])
        row[0] += 1
        row[1] += size

    def render(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        rows: list[tuple[str, int, int]] = [(p, n, b) for p, (n, b) in sorted(self.by_uploader.items())]
        rows.append(("total", self.count, self.bytes))
        return "\n".join(
            [
                f"{verb} {self.count} blob(s), {self.bytes} bytes, unused for {self.retention_s / 86400:g} days"
                f" (and {self.leftovers} leftover file(s))",
                table(["uploaded by", "blobs", "bytes"], rows),
            ]
        )


def collect(retention_s: float | None = None, now: datetime | None = None, dry_run: bool = False) -> GcReport:
    """Remove the expired blobs of the configured store (Django configured: `wsgi.configure`)."""
    from django.conf import settings
    from django.db import transaction
    from django.utils import timezone

    from .access import blob_path
    from .models import Blob

    conf = settings.FEDSILO_FILESTORE
    retention_s = conf["retention_s"] if retention_s is None else retention_s
    cutoff = (now or timezone.now()) - timedelta(seconds=retention_s)
    report = GcReport(retention_s=retention_s, dry_run=dry_run)
    expired = Blob.objects.filter(last_used_at__lt=cutoff).order_by("key")
    if dry_run:
        for _, size, party in expired.values_list("key", "size", "uploaded_by").iterator():
            report.add(party, size)
        return report
    while True:
        with transaction.atomic():  # IMMEDIATE: no upload can refresh or re-store these blobs meanwhile
            batch = list(expired.values_list("key", "size", "uploaded_by")[:BATCH])
            for key, size, party in batch:
                blob_path(key).unlink(missing_ok=True)
                report.add(party, size)
            Blob.objects.filter(key__in=[b[0] for b in batch]).delete()  # and their Access rows
        if len(batch) < BATCH:
            break
    report.leftovers = _remove_leftovers(Path(conf["tmp"]), Path(conf["blobs"]), cutoff.timestamp())
    return report


def _remove_leftovers(tmp: Path, blobs: Path, cutoff: float) -> int:
    """Temp files of crashed uploads, and blob files without a row (a crash between move and commit)."""
    from .models import Blob

    removed = 0
    old_tmp = time.time() - TMP_MAX_AGE_S
    for path in tmp.glob("*"):
        if path.is_file() and path.stat().st_mtime < old_tmp:
            path.unlink(missing_ok=True)
            removed += 1
    candidates = [p for p in blobs.glob("??/*") if is_sha256(p.name) and p.stat().st_mtime < cutoff]
    known = set(Blob.objects.filter(key__in=[p.name for p in candidates]).values_list("key", flat=True))
    for path in candidates:
        if path.name not in known:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def run_gc(netdir: str | Path, dry_run: bool = False) -> GcReport:
    """`fedsilo network gc`: configure Django for `netdir` and collect once."""
    from ..provision import load_config
    from .wsgi import configure

    load_config(netdir)  # a clear error when netdir is not a network directory
    configure(netdir)
    return collect(dry_run=dry_run)


def gc_forever(interval_s: float, stop: threading.Event) -> None:
    """The running store's collector thread: collect every `interval_s` until `stop` (an Event) is set."""
    while not stop.wait(interval_s):
        try:
            report = collect()
        except Exception:
            log.exception("retention: collection failed; retrying in %gs", interval_s)
            continue
        finally:
            # Hours pass between collections: no connection held meanwhile, none left open at shutdown
            # (SQLite checkpoints and removes its WAL when the last connection closes).
            from django.db import connections

            connections.close_all()
        if report.count or report.leftovers:
            log.info("retention: %s", report.render())
