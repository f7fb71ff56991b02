"""`python -m fedsilo.network.filestore.serve NETDIR`: the file store under waitress.

Why waitress and not gunicorn's gthread workers: a gthread worker thread reads a request's headers
and body itself, so 12 connections trickling headers (no token needed) or 16 authenticated uploads
trickling bodies held all 2 x 4 threads and left health checks unanswered for over 5 s. Waitress
reads headers and bodies on its async loop (bodies over `inbuf_overflow` spool to a temp file under
NETDIR/filestore/tmp, never whole in memory) and hands a request to a worker thread only once it
has arrived; responses drain on the same loop, so slow readers hold no thread either.
"""

from __future__ import annotations

import argparse
import logging
import resource
import signal
import sys
import tempfile
import threading
from typing import Any

from ..provision import NetworkConfig, load_config, network_paths

THREADS = 8
"""As many request threads as gunicorn's 2 workers x 4 threads had; they only run the views now."""
CONNECTION_LIMIT = 1000
"""Open connections served at once; slow clients each hold a socket, never a thread."""
CHANNEL_TIMEOUT_S = 75
"""An idle connection (no byte in either direction) is closed after this; above the clients' gap
between rounds would be nicer, but a silent half-open socket must not stay forever."""
BODY_SLACK = 64 << 20
"""Bodies up to max_upload_bytes + this are read whole so the view answers a JSON 413 (views.DRAIN_LIMIT);
larger ones are refused by waitress itself."""

RECV_BYTES = 256 << 10

log = logging.getLogger("fedsilo.network.filestore")


def waitress_options(cfg: NetworkConfig) -> dict[str, Any]:
    return {
        "host": cfg.host,
        "port": cfg.http_port,
        "threads": THREADS,
        "connection_limit": CONNECTION_LIMIT,
        "channel_timeout": CHANNEL_TIMEOUT_S,
        "asyncore_use_poll": True,  # select() stops at 1024 descriptors
        "max_request_body_size": cfg.max_upload_bytes + BODY_SLACK,
        # A file response (wsgi.file_wrapper) counts whole against this mark; above it the worker thread
        # would wait for a slow reader to drain it. The file is sent from disk, so no memory is at stake.
        "outbuf_high_watermark": cfg.max_upload_bytes + BODY_SLACK,
        # waitress reads 8 KiB per recv() by default: a 40 MB upload took 0.36-0.41 s against gunicorn's
        # 0.25 s. 256 KiB per call: 0.27 s up, 0.13 s down (gunicorn 0.25-0.26 s, 0.12 s); 1 MiB was no
        # better (0.32 s). Median of 5, bench/filestore_transfer.py, this 2-core VM while quiet.
        "recv_bytes": RECV_BYTES,
        "ident": "fedsilo-filestore",
        "clear_untrusted_proxy_headers": True,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fedsilo-filestore", description=__doc__)
    parser.add_argument("netdir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    paths = network_paths(args.netdir)
    cfg = load_config(paths.root)
    paths.tmp.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(paths.tmp)  # waitress spools bodies here: the store's disk, not /tmp
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = CONNECTION_LIMIT + 200
    if soft < want and (hard == resource.RLIM_INFINITY or hard >= want):
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    import waitress

    from .retention import gc_forever
    from .wsgi import create_app

    app = create_app(paths.root)
    from django.conf import settings

    stop = threading.Event()
    threading.Thread(
        target=gc_forever, args=(settings.FEDSILO_FILESTORE["gc_interval_s"], stop), name="retention", daemon=True
    ).start()
    server = waitress.create_server(app, **waitress_options(cfg))

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    log.info("file store serving http://%s:%s (waitress, %d threads)", cfg.host, cfg.http_port, THREADS)
    try:
        server.run()
    finally:
        stop.set()
        server.close()
        log.info("file store stopped")


if __name__ == "__main__":
    main(sys.argv[1:])
