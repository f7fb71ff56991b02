"""What the researcher and node sides must agree on: plan API, datasets, serialisation, config."""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("fedsilo")
except _metadata.PackageNotFoundError:  # running from a checkout without installation
    __version__ = "0.0.0+local"

PROTOCOL_VERSION = 1
