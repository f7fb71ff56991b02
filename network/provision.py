"""The network directory: configuration, the party registry, credentials and broker access files.

Layout (see docs/internals.md):

    NETDIR/network.toml            host, ports, broker kind, upload limit
    NETDIR/parties.json            name -> {role, token_sha256, mqtt_password_hash}; 0600, hashes only
    NETDIR/credentials/<name>.json the party's client-side `Credentials` (its secrets); 0600
    NETDIR/broker/                 mosquitto.conf, passwd, acl (generated) and the broker log
    NETDIR/filestore/              blobs/<aa>/<key>, tmp/, db.sqlite3
    NETDIR/state.json              written when the network is ready; removed on a clean stop
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from filelock import FileLock
from pydantic import BaseModel, ConfigDict, Field

from fedsilo.common.config import read_toml, validate, write_toml
from fedsilo.common.errors import ConfigError

from . import pki, topics
from .credentials import Credentials, FileStoreSettings, MqttSettings

Role = Literal["node", "researcher", "admin"]
ROLES: tuple[str, ...] = ("node", "researcher", "admin")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
DEFAULT_RESEARCHER = "researcher"
MONITOR = "_monitor"
"""The network's own health-probe party (role admin: no topic rights). Brokers bind a client id to its
username, so probing with a real party's credentials would knock that party's connection off."""
PBKDF2_ITERATIONS = 101  # mosquitto_passwd's default; the passwords are 256-bit random, not guessable


class NetworkConfig(BaseModel):
    """`network.toml`."""

    model_config = ConfigDict(extra="forbid")
    host: str = "127.0.0.1"
    advertise_host: str | None = None
    """Address written into credentials files; defaults to `host` (127.0.0.1 when host is a wildcard)."""
    mqtt_port: int = Field(1883, ge=0, le=65535)
    http_port: int = Field(8800, ge=0, le=65535)
    broker: Literal["mosquitto", "embedded"] = "embedded"
    max_upload_bytes: int = Field(1 << 30, gt=0)
    # File-store quotas per party (what it uploaded and has not expired), and retention (issue 7 §5):
    # a blob not uploaded, granted or read for `retention_days` is removed by `fedsilo network gc` and
    # by the running store every `gc_interval_s`. At least an hour, far above any round timeout.
    quota_bytes: int = Field(20 << 30, gt=0)
    quota_blobs: int = Field(1000, gt=0)
    retention_days: float = Field(7.0, ge=1 / 24)
    gc_interval_s: float = Field(3600.0, gt=0)
    # TLS (issue 10): on by default; the CA lives in NETDIR/pki (`pki.py`). `mutual_tls`: the broker and the
    # file store also ask each client for a certificate of the consortium CA (every party's kit carries one).
    tls: bool = True
    mutual_tls: bool = False

    @property
    def public_host(self) -> str:
        if self.advertise_host:
            return self.advertise_host
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host

    @property
    def filestore_url(self) -> str:
        host = self.public_host
        if ":" in host:
            host = f"[{host}]"
        return f"{'https' if self.tls else 'http'}://{host}:{self.http_port}"


@dataclass(frozen=True)
class NetworkPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "network.toml"

    @property
    def parties(self) -> Path:
        return self.root / "parties.json"

    @property
    def credentials_dir(self) -> Path:
        return self.root / "credentials"

    @property
    def broker_dir(self) -> Path:
        return self.root / "broker"

    @property
    def filestore_dir(self) -> Path:
        return self.root / "filestore"

    @property
    def blobs(self) -> Path:
        return self.filestore_dir / "blobs"

    @property
    def tmp(self) -> Path:
        return self.filestore_dir / "tmp"

    @property
    def db(self) -> Path:
        return self.filestore_dir / "db.sqlite3"

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def lock(self) -> Path:
        return self.root / ".parties.lock"

    def credentials(self, party: str) -> Path:
        return self.credentials_dir / f"{party}.json"


def network_paths(netdir: str | Path) -> NetworkPaths:
    return NetworkPaths(Path(netdir).expanduser().resolve())


# ---------------------------------------------------------------------------------------- config
def init_network(
    netdir: str | Path,
    host: str | None = None,
    mqtt_port: int | None = None,
    http_port: int | None = None,
    broker: Literal["mosquitto", "embedded"] | None = None,
    max_upload_bytes: int | None = None,
    tls: bool | None = None,
    mutual_tls: bool | None = None,
) -> NetworkConfig:
    """Create the directory layout and write `network.toml`; given values override the stored ones.

    Credentials files already written are updated when the host or a port changed.
    """
    paths = network_paths(netdir)
    for d in (paths.root, paths.credentials_dir, paths.broker_dir, paths.blobs, paths.tmp):
        d.mkdir(parents=True, exist_ok=True)
    os.chmod(paths.root, 0o700)  # credentials live below
    old = load_config(paths.root) if paths.config.is_file() else None
    data = old.model_dump() if old else {}
    overrides = {
        "host": host,
        "mqtt_port": mqtt_port,
        "http_port": http_port,
        "broker": broker,
        "max_upload_bytes": max_upload_bytes,
        "tls": tls,
        "mutual_tls": mutual_tls,
    }
    data.update({k: v for k, v in overrides.items() if v is not None})
    cfg = validate(NetworkConfig, data, str(paths.config))
    save_config(paths.root, cfg)
    new_ca = cfg.tls and not pki.CertificateAuthority.exists(paths.pki)  # e.g. a directory made before TLS
    if cfg.tls:
        pki.ensure_ca(paths.pki)
    where = (cfg.public_host, cfg.mqtt_port, cfg.http_port, cfg.tls)
    if old is not None and (new_ca or (old.public_host, old.mqtt_port, old.http_port, old.tls) != where):
        refresh_credentials(paths.root, cfg)
    return cfg


def load_config(netdir: str | Path) -> NetworkConfig:
    paths = network_paths(netdir)
    if not paths.config.is_file():
        raise ConfigError(f"{paths.root}: not a network directory (no network.toml); run `fedsilo network start`")
    return validate(NetworkConfig, read_toml(paths.config), str(paths.config))


def save_config(netdir: str | Path, cfg: NetworkConfig) -> None:
    write_toml(network_paths(netdir).config, cfg.model_dump())


# ---------------------------------------------------------------------------------------- secrets
def hash_password(password: str) -> str:
    """Mosquitto's `$7$` format (PBKDF2-SHA512), which the embedded broker verifies too."""
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS)
    return f"$7${PBKDF2_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, hashed: str) -> bool:
    try:
        _, scheme, iterations, salt, digest = hashed.split("$")
        if scheme != "7":
            return False
        computed = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt), int(iterations))
    except ValueError:
        return False
    return hmac.compare_digest(base64.b64encode(computed).decode(), digest)


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# ---------------------------------------------------------------------------------------- parties
def load_parties(netdir: str | Path) -> dict[str, dict[str, Any]]:
    """The server-side registry: name -> {role, token_sha256, mqtt_password_hash, created_at}."""
    path = network_paths(netdir).parties
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    return data.get("parties", {})


def _write_parties(paths: NetworkPaths, parties: dict[str, dict[str, Any]]) -> None:
    tmp = paths.parties.with_suffix(".json.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"format_version": 1, "parties": parties}, f, indent=2)
    os.replace(tmp, paths.parties)  # a new inode: readers keyed on stat see the change at once


def add_party(netdir: str | Path, name: str, role: str, csr: bytes | None = None) -> Credentials:
    """Register a party, write its credentials file and make a running broker accept it.

    With TLS on, the party gets a certificate: for a fresh key, or for the site's key in `csr` (then the
    credentials carry no key: the site adds its own, `kits.accept_kit`)."""
    paths = network_paths(netdir)
    if not NAME_PATTERN.match(name):
        raise ConfigError(
            f"invalid party name '{name}': use 1-64 letters, digits, '_', '.' or '-' (it becomes the MQTT username)"
        )
    if role not in ROLES or (role == "admin" and name != MONITOR):
        raise ConfigError(f"invalid role '{role}': choose one of {', '.join(ROLES)}")
    cfg = load_config(paths.root)
    with FileLock(str(paths.lock), timeout=30):
        parties = load_parties(paths.root)
        if name in parties:
            raise ConfigError(
                f"a party named '{name}' already exists in {paths.root} (role {parties[name]['role']}); "
                f"its credentials are in {paths.credentials(name)}; choose another name"
            )
        token = secrets.token_urlsafe(32)
        password = secrets.token_urlsafe(32)
        parties[name] = {
            "role": role,
            "token_sha256": token_sha256(token),
            "mqtt_password_hash": hash_password(password),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        creds = Credentials(
            party=name,
            role=role,  # type: ignore[arg-type]
            mqtt=MqttSettings(host=cfg.public_host, port=cfg.mqtt_port, username=name, password=password),
            filestore=FileStoreSettings(url=cfg.filestore_url, token=token),
            tls=pki.party_tls(paths.pki, name, role, csr) if cfg.tls else None,
        )
        from . import roster  # roster imports this module

        creds = roster.enrol(paths.root, creds)  # its signing key, in a re-signed roster
        creds.save(paths.credentials(name))
        _write_parties(paths, parties)
        write_broker_files(paths.root, parties)
    if reload_broker(paths.root, check=creds):
        roster.publish_roster(paths.root)  # running parties learn the new one from the retained roster
    return creds


def ensure_monitor(netdir: str | Path) -> Credentials:
    """The probe party's credentials, registered on first use."""
    paths = network_paths(netdir)
    if MONITOR not in load_parties(paths.root):
        return add_party(paths.root, MONITOR, "admin")
    return Credentials.load(paths.credentials(MONITOR))


def refresh_credentials(netdir: str | Path, cfg: NetworkConfig | None = None) -> list[Path]:
    """Rewrite addresses in every credentials file after the host or a port changed (secrets are kept)."""
    paths = network_paths(netdir)
    cfg = cfg or load_config(paths.root)
    changed = []
    for path in sorted(paths.credentials_dir.glob("*.json")):
        creds = Credentials.load(path)
        new = creds.model_copy(
            update={
                "mqtt": creds.mqtt.model_copy(update={"host": cfg.public_host, "port": cfg.mqtt_port}),
                "filestore": creds.filestore.model_copy(update={"url": cfg.filestore_url}),
                "tls": (creds.tls or pki.party_tls(paths.pki, creds.party, creds.role)) if cfg.tls else None,
            }
        )
        new = Credentials.model_validate(new.model_dump())  # shares (or drops) `tls` with mqtt and filestore
        if new != creds:
            new.save(path)
            changed.append(path)
    return changed


# ---------------------------------------------------------------------------------------- ACL
def acl_rules(name: str, role: str) -> list[tuple[str, str]]:
    """(access, topic filter) pairs for one party; access is "read" or "write" (docs/internals.md).

    A party writes only topics whose last level is its own name, so the topic proves who published."""
    if role == "node":
        return [
            ("read", topics.BROADCAST_ALL),
            ("read", topics.node_inbox(name)),
            ("read", topics.ROSTER),
            ("write", topics.researcher("+", name)),
            ("write", topics.presence(name)),
        ]
    if role == "researcher":
        return [
            ("read", topics.researcher_inbox(name)),
            ("read", topics.PRESENCE_ALL),
            ("read", topics.ROSTER),
            ("write", topics.broadcast(name)),
            ("write", topics.node("+", name)),
        ]
    return [("write", topics.ROSTER)] if role == "admin" else []


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT filter matching; wildcards in `topic` are literal, so a subscription's filter is allowed
    only when an ACL pattern covers it entirely (as mosquitto decides)."""
    p_levels = pattern.split("/")
    t_levels = topic.split("/")
    for i, p in enumerate(p_levels):
        if p == "#":
            return True
        if i >= len(t_levels):
            return False
        if p != "+" and p != t_levels[i]:
            return False
    return len(p_levels) == len(t_levels)


def acl_allows(name: str, role: str, topic: str, access: str) -> bool:
    return any(a == access and topic_matches(p, topic) for a, p in acl_rules(name, role))


def mosquitto_acl(parties: dict[str, dict[str, Any]]) -> str:
    # One `user` section per party rather than global `pattern ... %u` lines: mosquitto applies patterns
    # to every user, so role-specific rights (a node writing researcher/+) cannot be expressed with them
    # without also granting nodes each other's `researcher/<name>` channel.
    lines = ["# generated by fedsilo from parties.json; do not edit", ""]
    for name in sorted(parties):
        lines.append(f"user {name}")
        for access, pattern in acl_rules(name, parties[name]["role"]):
            lines.append(f"topic {access} {pattern}")
        lines.append("")
    return "\n".join(lines)


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_broker_files(netdir: str | Path, parties: dict[str, dict[str, Any]] | None = None) -> None:
    """Generate mosquitto's password and ACL files from the registry."""
    paths = network_paths(netdir)
    parties = load_parties(paths.root) if parties is None else parties
    paths.broker_dir.mkdir(parents=True, exist_ok=True)
    passwd = "".join(f"{n}:{p['mqtt_password_hash']}\n" for n, p in sorted(parties.items()))
    _write_private(paths.broker_dir / "passwd", passwd)
    _write_private(paths.broker_dir / "acl", mosquitto_acl(parties))


# ---------------------------------------------------------------------------------------- state
def read_state(netdir: str | Path) -> dict[str, Any] | None:
    path = network_paths(netdir).state
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_state(netdir: str | Path, state: dict[str, Any]) -> None:
    _write_private(network_paths(netdir).state, json.dumps(state, indent=2))


def remove_state(netdir: str | Path) -> None:
    network_paths(netdir).state.unlink(missing_ok=True)


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reload_broker(netdir: str | Path, check: Credentials | None = None, timeout: float = 5.0) -> bool:
    """Make a running broker pick up the regenerated password/ACL files; False when none runs.

    Mosquitto gets SIGHUP; the embedded broker re-reads parties.json by itself. With `check`, wait
    until the broker accepts those credentials so that the caller can connect right away.
    """
    state = read_state(netdir)
    if not state or not pid_alive(state.get("pid")):
        return False
    if state.get("broker") == "mosquitto":
        if not pid_alive(state.get("broker_pid")):
            return False
        os.kill(state["broker_pid"], signal.SIGHUP)
    if check is not None:
        from .broker import broker_accepts

        deadline = time.monotonic() + timeout
        while not broker_accepts(check.mqtt, timeout=1.0):
            if time.monotonic() > deadline:
                raise ConfigError(f"the running broker did not accept the new party '{check.party}' after reload")
            time.sleep(0.05)
    return True
