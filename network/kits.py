"""Startup kits: everything one party needs to join the network, as a folder and as a .tar.gz.

    KITS/<party>/credentials.json   the party's whole `Credentials` (0600): addresses, MQTT password, file-store
                                    token, TLS CA + certificate + key, signing key, authority key and roster
    KITS/<party>/ca.crt             the consortium CA (the same as in credentials.json; for other tools)
    KITS/<party>/<party>.crt        the party's certificate; <party>.key its key (absent when the site kept it)
    KITS/<party>/roster.signed      the authority-signed roster, when the network has one
    KITS/<party>/README.txt         what to run with it
    KITS/<party>.tar.gz             the same folder, one file to hand over

`fedsilo node init --kit PATH` and `Experiment(..., network=PATH)` take the folder or the archive as is
(`load_kit`). An archive is never unpacked: only its `credentials.json` is read, so a crafted archive
cannot write anywhere.

    folder, archive = make_kit(netdir, "hospital-a", out=netdir / "kits")
    creds = load_kit(archive)
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

from fedsilo.common.config import validate
from fedsilo.common.errors import ConfigError

from . import pki
from .credentials import Credentials
from .provision import network_paths

CREDENTIALS = "credentials.json"
MAX_CREDENTIALS_BYTES = 1 << 20
"""A credentials file is a few KiB (three PEMs and a roster); anything far larger is not one."""
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")


def is_kit(path: str | Path) -> bool:
    """Whether `path` looks like a startup kit: a folder holding credentials.json, or a .tar.gz."""
    p = Path(path)
    return (p.is_dir() and (p / CREDENTIALS).is_file()) or (p.is_file() and p.name.endswith(ARCHIVE_SUFFIXES))


def _readme(creds: Credentials) -> str:
    use = (
        f"fedsilo node init --dir NODE_DIR --kit {creds.party}.tar.gz\n    fedsilo node start --dir NODE_DIR"
        if creds.role == "node"
        else f'Experiment(..., network="{creds.party}.tar.gz")   # or the unpacked folder'
    )
    key = (
        "credentials.json holds this party's private keys: keep the kit private (mode 0600)."
        if creds.tls is None or creds.tls.key
        else "This kit has no TLS private key: the site keeps its own. Add it with\n"
        f"    fedsilo provision accept --kit {creds.party}.tar.gz --key {creds.party}.key --out KIT_DIR"
    )
    return (
        f"fedsilo startup kit for {creds.role} '{creds.party}'\n\n"
        f"broker      {creds.mqtt.host}:{creds.mqtt.port} ({'TLS' if creds.tls else 'plain TCP'})\n"
        f"file store  {creds.filestore.url}\n\nUse:\n    {use}\n\n{key}\n"
    )


def write_kit(creds: Credentials, folder: Path, roster: Path | None = None) -> Path:
    """Write the kit folder for `creds` (replacing an older one); return it."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    os.chmod(folder, 0o700)
    creds.save(folder / CREDENTIALS)
    if creds.tls is not None:
        (folder / "ca.crt").write_text(creds.tls.ca, encoding="utf-8")
        if creds.tls.cert:
            (folder / f"{creds.party}.crt").write_text(creds.tls.cert, encoding="utf-8")
        if creds.tls.key:
            pki.write_private(folder / f"{creds.party}.key", creds.tls.key)
    if roster is not None and roster.is_file():
        shutil.copyfile(roster, folder / "roster.signed")
    (folder / "README.txt").write_text(_readme(creds), encoding="utf-8")
    return folder


def archive(folder: Path) -> Path:
    """`folder` as `<folder>.tar.gz` next to it (mode 0600), members under `<folder name>/`."""
    target = folder.with_name(folder.name + ".tar.gz")
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return target


def make_kit(netdir: str | Path, party: str, out: str | Path | None = None) -> tuple[Path, Path]:
    """The kit of a registered party, from the network's copy of its credentials: (folder, archive)."""
    paths = network_paths(netdir)
    creds = Credentials.load(paths.credentials(party))
    kits = Path(out) if out is not None else paths.root / "kits"
    kits.mkdir(parents=True, exist_ok=True)
    os.chmod(kits, 0o700)
    folder = write_kit(creds, kits / party, paths.root / "roster.signed")
    return folder, archive(folder)


def _read_archive(path: Path) -> bytes:
    """The bytes of the one `credentials.json` in a kit archive (at its top or one folder down); no
    member is extracted, and links or devices named so are refused."""
    try:
        with tarfile.open(path, mode="r:gz") as tar:
            found = [m for m in tar.getmembers() if Path(m.name).name == CREDENTIALS and len(Path(m.name).parts) <= 2]
            if len(found) != 1:
                raise ConfigError(f"{path}: a startup kit holds exactly one {CREDENTIALS}; found {len(found)}")
            member = found[0]
            if not member.isfile() or member.size > MAX_CREDENTIALS_BYTES:
                raise ConfigError(f"{path}: {member.name} is not a regular file of at most 1 MiB")
            f = tar.extractfile(member)
            assert f is not None
            return f.read(MAX_CREDENTIALS_BYTES + 1)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ConfigError(f"{path}: not a readable .tar.gz startup kit ({exc})") from None


def _read(path: str | Path) -> Credentials:
    p = Path(path).expanduser()
    if p.is_dir():
        return Credentials.load(p / CREDENTIALS)
    if not p.name.endswith(ARCHIVE_SUFFIXES):
        return Credentials.load(p)
    try:
        data = json.load(io.BytesIO(_read_archive(p)))
    except ValueError as exc:
        raise ConfigError(f"{p}: its {CREDENTIALS} is not valid JSON ({exc})") from None
    return validate(Credentials, data, f"{p}:{CREDENTIALS}")


def load_kit(path: str | Path) -> Credentials:
    """The credentials in a kit folder or archive (a plain credentials file is taken too)."""
    creds = _read(path)
    if creds.tls is not None and creds.tls.cert and not creds.tls.key:
        raise ConfigError(
            f"{path}: this kit carries no TLS private key (the site keeps its own); run "
            f"`fedsilo provision accept --kit {path} --key {creds.party}.key --out KIT_DIR` and use KIT_DIR"
        )
    return creds


def accept_kit(kit: str | Path, key_file: str | Path, out: str | Path) -> Path:
    """A site's complete kit at `out`: the kit the provisioner signed, plus the key the site kept."""
    creds = _read(kit)
    if creds.tls is None or not creds.tls.cert:
        raise ConfigError(f"{kit}: this kit has no TLS certificate to pair a key with")
    key = Path(key_file).read_text(encoding="utf-8")
    pki.check_pair(creds.tls.cert, key)
    full = Credentials.model_validate(creds.model_dump() | {"tls": creds.tls.model_dump() | {"key": key}})
    return write_kit(full, Path(out))
