"""The WSGI application: `create_app(netdir)`, served by `fedsilo.network.filestore.serve`."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def configure(netdir: str | Path) -> None:
    """Configure Django from the network directory and apply migrations (the store and `network gc`)."""
    import django
    from django.conf import settings

    from .settings import build_settings

    if not settings.configured:
        settings.configure(**build_settings(netdir))
    django.setup()

    from django.core.management import call_command
    from django.db import connection

    call_command("migrate", interactive=False, verbosity=0)
    with connection.cursor() as cur:
        cur.execute("PRAGMA journal_mode=WAL")  # persistent in the database file


def create_app(netdir: str | Path) -> Any:
    """Configure Django, apply migrations, return the WSGI application."""
    configure(netdir)
    from django.core.wsgi import get_wsgi_application
    from django.urls import get_resolver

    # Import the URLconf (views, DRF) now rather than on the first request (0.3 s).
    get_resolver().url_patterns  # noqa: B018 - the attribute access does the import
    return get_wsgi_application()
