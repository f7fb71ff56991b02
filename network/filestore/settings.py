"""Django settings built from a network directory (no environment reads): `build_settings(netdir)`."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from ..provision import load_config, network_paths


def build_settings(netdir: str | Path) -> dict[str, Any]:
    paths = network_paths(netdir)
    cfg = load_config(paths.root)
    return {
        "DEBUG": False,
        # Nothing is signed (no sessions, no CSRF): the key only has to exist.
        "SECRET_KEY": secrets.token_urlsafe(50),
        "ALLOWED_HOSTS": ["*"],
        "ROOT_URLCONF": "fedsilo.network.filestore.urls",
        "INSTALLED_APPS": ["rest_framework", "fedsilo.network.filestore.apps.FileStoreConfig"],
        "MIDDLEWARE": [],
        "DATABASES": {
            "default": {
                "ENGINE": "django.db.backends.sqlite3",
                "NAME": str(paths.db),
                # Kept open per worker thread: closing the last connection checkpoints the WAL (an fsync).
                "CONN_MAX_AGE": None,
                # WAL + synchronous=NORMAL: an insert per new blob without an fsync on the hot path;
                # IMMEDIATE avoids "database is locked" upgrades between the worker processes.
                "OPTIONS": {
                    "init_command": "PRAGMA synchronous=NORMAL",
                    "transaction_mode": "IMMEDIATE",
                    "timeout": 20,
                },
            }
        },
        "USE_TZ": True,
        "DEFAULT_CHARSET": "utf-8",
        "REST_FRAMEWORK": {
            "DEFAULT_AUTHENTICATION_CLASSES": ["fedsilo.network.filestore.auth.PartyTokenAuthentication"],
            "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
            "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
            "DEFAULT_PARSER_CLASSES": [],
            "UNAUTHENTICATED_USER": None,
            "UNAUTHENTICATED_TOKEN": None,
            "EXCEPTION_HANDLER": "fedsilo.network.filestore.views.json_exception_handler",
        },
        "FEDSILO_FILESTORE": {
            "blobs": paths.blobs,
            "tmp": paths.tmp,
            "parties": paths.parties,
            "max_upload_bytes": cfg.max_upload_bytes,
            "quota_bytes": cfg.quota_bytes,
            "quota_blobs": cfg.quota_blobs,
            "retention_s": cfg.retention_days * 86400,
            "gc_interval_s": cfg.gc_interval_s,
        },
        "LOGGING": {
            "version": 1,
            "disable_existing_loggers": False,
            "handlers": {"stderr": {"class": "logging.StreamHandler"}},
            "loggers": {
                # Not propagated (here and below): serve.py's root handler printed each line twice. django.request
                # at ERROR: a 404 is an answer here (large uploads ask HEAD first), not a warning for the log.
                "django": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
                "django.request": {"handlers": ["stderr"], "level": "ERROR", "propagate": False},
                "fedsilo": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
                "uvicorn": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
            },
        },
    }
