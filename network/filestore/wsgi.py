"""WSGI entry point for gunicorn: `fedsilo.network.filestore.wsgi:create_app('/path/to/netdir')`."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def create_app(netdir: str | Path) -> Any:
    """Configure Django from the network directory, apply migrations, return the WSGI application.

    Run once in gunicorn's master (`--preload`), so that migrations never race between workers.
    """
    import django
    from django.conf import settings

    from .settings import build_settings

    if not settings.configured:
        settings.configure(**build_settings(netdir))
    django.setup()

    from django.core.management import call_command
    from django.core.wsgi import get_wsgi_application
    from django.db import connection, connections

    call_command("migrate", interactive=False, verbosity=0)
    # Import the URLconf (views, DRF) here too, or every forked worker does it on its first request (0.3 s).
    from django.urls import get_resolver

    get_resolver().url_patterns  # noqa: B018 - the attribute access does the import
    with connection.cursor() as cur:
        cur.execute("PRAGMA journal_mode=WAL")  # persistent in the database file
    connections.close_all()  # no SQLite handle may cross gunicorn's fork
    return get_wsgi_application()
