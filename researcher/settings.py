"""Checks and conversions behind `Experiment`'s settings: credentials, folders, tags, pluggable objects.

    creds = resolve_credentials("run/quickstart/network")    # a network folder or a credentials file
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from fedsilo.common.errors import ConfigError, FedsiloError
from fedsilo.network.credentials import Credentials
from fedsilo.network.kits import is_kit, load_kit

NETWORK_ENV = "FEDSILO_NETWORK"
EXPERIMENTS_ENV = "FEDSILO_EXPERIMENTS"


class ExperimentError(FedsiloError):
    """The experiment is not ready for what was asked (missing plan, no training data, ...)."""


def resolve_credentials(network: str | Path | Credentials | None) -> Credentials:
    if isinstance(network, Credentials):
        return network
    if network is None:
        network = os.environ.get(NETWORK_ENV)
    if not network:
        raise ConfigError(f"no network given: pass network=<network folder or credentials file>, or set ${NETWORK_ENV}")
    path = Path(network).expanduser()
    if is_kit(path):  # a startup kit, folder or .tar.gz (`fedsilo provision`)
        creds = load_kit(path)
    else:
        if path.is_dir():
            path = path / "credentials" / "researcher.json"
        creds = Credentials.load(path)
    if creds.role != "researcher":
        raise ConfigError(f"{path}: credentials of a {creds.role}, not of a researcher")
    return creds


def absolute(folder: str | Path) -> Path:
    """Experiment paths are absolute, so that what `breakpoint()` returns still works after a `chdir`."""
    return Path(folder).expanduser().resolve()


def tags_list(tags: str | list[str] | None) -> list[str] | None:
    if tags is None:
        return None
    out = [tags] if isinstance(tags, str) else [str(t) for t in tags]
    if not out or any(not t for t in out):
        raise ConfigError(f"tags must be a non-empty string or list of non-empty strings, got {tags!r}")
    return out


def instance(value: Any, base: type, what: str) -> Any:
    if isinstance(value, type) and issubclass(value, base):
        return value()
    if isinstance(value, base):
        return value
    raise ConfigError(f"{what} must be a {base.__name__} instance or subclass, got {value!r}")


def class_path(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}:{cls.__qualname__}"


def restore(entry: dict[str, Any], base: type, what: str, **settings: Any) -> Any:
    path = entry.get("class", "")
    module_name, _, qualname = path.partition(":")
    try:
        if module_name == "__main__":
            raise ImportError("defined in a notebook or script")
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"cannot re-create the {what} {path!r} ({exc}); pass {what}=... to Experiment.load_breakpoint"
        ) from None
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise ConfigError(f"{path!r} is not a {base.__name__}")
    return obj(**settings)
