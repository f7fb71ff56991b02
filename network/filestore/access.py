"""Who may read a blob, how much a party may store, when a blob was last used (issue 7 §5).

A party may read a blob it uploaded (sent its bytes, so it knows them) or that an uploader granted
to it (`X-Fedsilo-Readers` on PUT, or POST .../readers). Anyone else is answered 404, exactly as for
a blob that does not exist, so a token cannot probe which blobs are stored. Quotas count the blobs a
party uploaded and that have not expired; every upload, grant and read refreshes `last_used_at`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Count, F, Sum
from django.utils import timezone

from .auth import party_names
from .errors import ApiError
from .models import Access, Blob

READERS_HEADER = "HTTP_X_FEDSILO_READERS"
HOLD_HEADER = "HTTP_X_FEDSILO_READERS_HOLD"
"""`X-Fedsilo-Readers-Hold: 1` on an upload: the readers named hold the blob until they release it (a node's
update, handed over to the researcher); without it a reader may read the blob while its uploaders keep it."""
MAX_READERS = 1000
"""More readers than any consortium has nodes; bounds the rows one request can add."""
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")  # provision.NAME_PATTERN: party names as registered


def _conf() -> dict[str, Any]:
    return settings.FEDSILO_FILESTORE


def blob_path(key: str) -> Path:
    """blobs/<first two hex characters of its digest>/<key>: a BLAKE3 key's `blake3-` does not pick the folder."""
    return Path(_conf()["blobs"]) / key[-64:-62] / key


def not_found(key: str) -> ApiError:
    """The one answer for "no such blob" and "not yours to read": the two must look the same."""
    return ApiError(404, f"no blob {key} in the file store that you may read")


def parse_readers(value: Any) -> list[str]:
    """Readers from a header (`a,b`) or a JSON list; each must be a registered party."""
    if isinstance(value, str):
        names = [n.strip() for n in value.split(",") if n.strip()]
    elif isinstance(value, list) and all(isinstance(n, str) for n in value):
        names = value
    else:
        raise ApiError(400, "readers must be a list of party names")
    if len(names) > MAX_READERS:
        raise ApiError(400, f"{len(names)} readers named; at most {MAX_READERS}")
    bad = [n[:70] for n in names if not _NAME.match(n)]
    if bad:
        raise ApiError(400, f"not a party name: {bad[0]!r}")
    unknown = sorted(set(names) - party_names())
    if unknown:
        listed = ", ".join(unknown[:10])
        raise ApiError(400, f"unknown reader(s): {listed}; register them with `fedsilo network party add`")
    return sorted(set(names))


def readable(key: str, party: str) -> bool:
    return Access.objects.filter(blob_id=key, party=party).exists()


TOUCH_EVERY_S = 60.0
"""A read refreshes `last_used_at` only when it is older than this: a write takes SQLite's one write lock, and
K nodes fetching the same global model at once queued on it, once each. Retention is at least an hour, so a
blob outlives its last read by at least `retention - TOUCH_EVERY_S`."""


def touch(key: str) -> None:
    """Record a read of the blob (retention), writing only when the last record is older than `TOUCH_EVERY_S`."""
    now = timezone.now()
    stale = Blob.objects.filter(key=key, last_used_at__lt=now - timedelta(seconds=TOUCH_EVERY_S))
    if stale.exists():  # a read: WAL readers take no lock
        stale.update(last_used_at=now)


def usage(party: str) -> tuple[int, int]:
    """(blobs, bytes) the party uploaded and that are still stored."""
    got = Access.objects.filter(party=party, uploader=True).aggregate(n=Count("id"), size=Sum("blob__size"))
    return got["n"] or 0, got["size"] or 0


def _check_quota(party: str, size: int) -> None:
    blobs, used = usage(party)
    quota_blobs, quota_bytes = _conf()["quota_blobs"], _conf()["quota_bytes"]
    days = _conf()["retention_s"] / 86400
    hint = f"blobs expire {days:g} days after their last use, or the operator runs `fedsilo network gc`"
    if blobs + 1 > quota_blobs:
        raise ApiError(507, f"quota exceeded: party '{party}' stores {blobs} blobs, its quota is {quota_blobs}; {hint}")
    if used + size > quota_bytes:
        raise ApiError(
            507,
            f"quota exceeded: party '{party}' stores {used} bytes; {size} more would pass its quota of "
            f"{quota_bytes} bytes; {hint}",
        )


def store(key: str, size: int, tmp_name: str, party: str, readers: Iterable[str], hold: bool = False) -> bool:
    """Record an upload whose verified bytes are in `tmp_name`; True when the blob is new.

    One IMMEDIATE transaction (settings.py) checks the quota, moves the file and writes the rows, so
    concurrent uploads of one party cannot pass its quota together, and `gc` (which deletes rows and
    files in its own transaction) never removes a blob between this check and this write. Waiting on a Python
    lock instead of SQLite's busy handler (which sleeps 1, 2, 5, 10... ms) was measured and dropped
    (bench/filestore_requests.py, PUT 200 KB with 10 clients, 2026-11-30 20:05-20:07, load 5-7, alternated twice):
    38-61 requests/s against 117-130 without it.
    """
    final = blob_path(key)
    with transaction.atomic():
        blob = Blob.objects.filter(key=key).first()
        created = blob is None
        row = Access.objects.filter(blob=blob, party=party).first() if blob is not None else None
        mine = row is not None and row.uploader
        if not mine:
            _check_quota(party, size)
        if blob is None or not final.exists():
            final.parent.mkdir(exist_ok=True)
            # No fsync: blobs are content-addressed and the uploader keeps its copy until the round ends.
            os.replace(tmp_name, final)
        now = timezone.now()
        if created:
            blob = Blob.objects.create(key=key, size=size, uploaded_by=party, last_used_at=now)
        else:
            Blob.objects.filter(key=key).update(last_used_at=now)
        # each upload holds the blob once more: two experiments of one researcher may upload the same initial
        # model, and the first to end its round must not remove the other's
        if row is None:
            Access.objects.create(blob=blob, party=party, uploader=True, uploads=1)
        elif row.uploader:
            Access.objects.filter(pk=row.pk).update(uploads=F("uploads") + 1)
        else:  # a reader that now uploads the same bytes
            Access.objects.filter(pk=row.pk).update(uploader=True, uploads=1, holds=False)
        _add_readers(blob, readers, hold)
    return created


def grant(key: str, party: str, readers: Iterable[str]) -> list[str]:
    """Let `readers` read a blob `party` uploaded; 404 when it did not upload it. Returns all readers."""
    with transaction.atomic():
        if not Access.objects.filter(blob_id=key, party=party, uploader=True).exists():
            raise not_found(key)
        _add_readers(Blob(key=key), readers)
        Blob.objects.filter(key=key).update(last_used_at=timezone.now())
        return sorted(Access.objects.filter(blob_id=key).values_list("party", flat=True))


def release(key: str, party: str) -> bool:
    """`party` no longer needs the blob; True when that removed it (no row holds it any more). 404 when the
    party may not read it (released before as a reader, or never granted: the same answer as a missing blob).

    A reader's row goes; an uploader's row lets one of its uploads go (`uploads`) and stays, and the blob keeps
    counting in its quota until the blob goes, so that uploading, handing over to a friend and releasing cannot
    store past a quota. The blob goes once every uploader released each of its uploads and no reader it was handed
    over to (`holds`) still holds it: a round's update once the node (its uploader) and the researcher (the reader
    it was handed to) are done with it, the round's global model once the researcher is (the nodes only read it),
    without waiting `retention_days`. Measured
    (peerbench large, K=10, 2026-12-01): the store kept 440 MB a round, and on this VM every page the page cache
    grew into cost the store about 2.7 ms/MB to write (a fresh page the host backs on first touch): 3.0 s of the
    store's CPU a round against 2.1 s with the blobs of past rounds removed. Same transaction discipline as
    `store` and retention."""
    with transaction.atomic():
        row = Access.objects.filter(blob_id=key, party=party).first()
        if row is None:
            raise not_found(key)
        if row.uploader:
            if row.uploads > 0:
                Access.objects.filter(pk=row.pk).update(uploads=F("uploads") - 1)
        else:
            row.delete()
        rows = Access.objects.filter(blob_id=key)
        if rows.filter(uploader=True, uploads__gt=0).exists() or rows.filter(uploader=False, holds=True).exists():
            return False
        blob_path(key).unlink(missing_ok=True)
        Blob.objects.filter(key=key).delete()  # and every row left
        return True


def _add_readers(blob: Blob, readers: Iterable[str], hold: bool = False) -> None:
    readers = list(readers)
    Access.objects.bulk_create([Access(blob=blob, party=r, holds=hold) for r in readers], ignore_conflicts=True)
    if hold:  # readers granted before now hold it too (an uploader is never a reader row)
        Access.objects.filter(blob=blob, party__in=readers, uploader=False).update(holds=True)
