"""The consortium authority and its signed roster, kept in the network directory.

    NETDIR/authority.key   the authority's Ed25519 private key (base64), 0600: it never leaves this directory
    NETDIR/roster.signed   the current roster, signed by the authority (`common/signing.py`)

`enrol` gives a new party its signing key and adds it to a re-signed roster (called by `add_party`
under the registry lock); `publish_roster` puts the current roster on `topics.ROSTER`, retained, with
the network's `_monitor` credentials, so that parties made earlier learn about parties made later.

    creds = enrol(netdir, creds)      # signing_key, authority_key and roster filled in
    publish_roster(netdir)            # after the broker accepts the new party
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedsilo.common.signing import (
    Roster,
    RosterEntry,
    generate_key,
    private_b64,
    private_from_b64,
    public_b64,
)

from . import topics
from .credentials import Credentials

log = logging.getLogger(__name__)


def _paths(netdir: str | Path) -> tuple[Path, Path]:
    root = Path(netdir).expanduser().resolve()
    return root / "authority.key", root / "roster.signed"


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def authority(netdir: str | Path) -> Ed25519PrivateKey:
    """The authority's private key, made on first use."""
    key_path, _ = _paths(netdir)
    if key_path.is_file():
        return private_from_b64(key_path.read_text(encoding="ascii").strip())
    key = generate_key()
    _write_private(key_path, private_b64(key).encode())
    return key


def current(netdir: str | Path) -> Roster | None:
    """The roster in `roster.signed`, verified with the authority key (None when there is none yet)."""
    _, roster_path = _paths(netdir)
    if not roster_path.is_file():
        return None
    return Roster.verify(roster_path.read_bytes(), authority(netdir).public_key())


def signed_roster(netdir: str | Path) -> bytes | None:
    _, roster_path = _paths(netdir)
    return roster_path.read_bytes() if roster_path.is_file() else None


def enrol(netdir: str | Path, creds: Credentials) -> Credentials:
    """`creds` with a new signing key, the authority's public key and a roster that names the party
    (re-signed, version + 1). The caller holds the registry lock and saves the credentials."""
    key = generate_key()
    roster = _put(netdir, creds.party, RosterEntry(role=creds.role, key=public_b64(key)))
    return creds.model_copy(
        update={
            "signing_key": private_b64(key),
            "authority_key": public_b64(authority(netdir)),
            "roster": roster.decode(),
        }
    )


def _put(netdir: str | Path, party: str, entry: RosterEntry) -> bytes:
    old = current(netdir)
    parties = dict(old.parties) if old is not None else {}
    parties[party] = entry
    wire = Roster(version=(old.version if old else 0) + 1, issued_at=time.time(), parties=parties).sign(
        authority(netdir)
    )
    _write_private(_paths(netdir)[1], wire)
    return wire


def ensure_keys(netdir: str | Path, credentials_dir: Path) -> list[str]:
    """Give every credentials file under `credentials_dir` without a signing key one (networks made before
    signed messages); the parties changed. Their holders need the new files."""
    changed = []
    for path in sorted(credentials_dir.glob("*.json")):
        creds = Credentials.load(path)
        if creds.signing_key is None or creds.authority_key != public_b64(authority(netdir)):
            enrol(netdir, creds).save(path)
            changed.append(creds.party)
    return changed


PUBLISH_TRIES = 3


def publish_roster(netdir: str | Path, timeout: float = 10.0) -> bool:
    """Publish the current roster on `topics.ROSTER`, retained, as `_monitor`; False when there is none or
    the broker did not take it (logged). Retried: `_monitor` is also the health probe's client id, and a
    probe connecting meanwhile takes this connection over."""
    from .messaging import BrokerUnavailable, Messaging
    from .provision import MONITOR, network_paths

    wire = signed_roster(netdir)
    monitor = network_paths(netdir).credentials(MONITOR)
    if wire is None or not monitor.is_file():
        return False
    settings = Credentials.load(monitor).mqtt
    for attempt in range(1, PUBLISH_TRIES + 1):
        m = Messaging(MONITOR, settings, on_message=lambda *_: None, persistent=False)
        try:
            m.start(timeout=timeout)
            info = m.publish_raw(topics.ROSTER, wire, retain=True)
            info.wait_for_publish(timeout)
            if info.is_published():
                return True
        except (BrokerUnavailable, RuntimeError, ValueError) as exc:
            log.warning("roster not published (try %d): %s", attempt, exc)
        finally:
            m.stop()
    log.error("the roster could not be published on %s; parties added later stay unknown to running ones",
              topics.ROSTER)  # fmt: skip
    return False


class RosterPublisher:
    """Publishes the roster off the caller's thread; requests made while one runs coalesce into one more.

    The supervisor asks after every broker restart: publishing inline blocked its watch loop for up to
    3 x 10 s whenever the broker died again meanwhile, and restarts waited on it.

        publisher = RosterPublisher(netdir)
        publisher.request()   # returns at once
    """

    def __init__(self, netdir: str | Path) -> None:
        self._netdir = netdir
        self._lock = threading.Lock()
        self._pending = False
        self._thread: threading.Thread | None = None

    def request(self) -> None:
        with self._lock:
            self._pending = True
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="roster-publisher", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    self._thread = None
                    return
                self._pending = False
            publish_roster(self._netdir)
