"""`python -m fedsilo.network.filestore.serve NETDIR`: the file store under uvicorn, over HTTPS.

Why uvicorn (issue 10): waitress, which served it before, has no TLS. uvicorn reads headers and bodies
on its event loop, and Django's ASGI handler (`asgi.py`) reads a body whole (spooled to
NETDIR/filestore/tmp past 2.5 MiB) before a view runs in a thread; responses drain on the same loop. So
slow or stalled clients hold a socket and a coroutine, never a thread, as under waitress (which had
replaced gunicorn's threads for that: 28 trickling clients held every gunicorn thread for over 5 s).

Measured (40 MB blob, upload and verified download, median of 7, bench/filestore_transfer.py, this 2-core VM,
2026-11-30): waitress over plain HTTP 0.385 s up / 0.195 s down at load 1.5; uvicorn over HTTPS 0.390 s /
0.237 s at load 2.5, minutes later. While 7 other test suites ran (load 10-15) the same store took 0.8-2.3 s /
0.39-0.95 s over HTTP and 1.1-2.7 s / 0.56-1.2 s over HTTPS: TLS costs CPU (asyncio's TLS runs through a memory
BIO in Python's loop), which shows only when the cores are taken.
"""

from __future__ import annotations

import argparse
import logging
import resource
import ssl
import sys
import threading
from typing import Any

from fedsilo.common.malloc import set_malloc

from ..pki import ensure_server
from ..provision import NetworkConfig, load_config, network_paths
from .protocol import BodyStreamingProtocol

CONNECTION_LIMIT = 1000
"""Open connections served at once (uvicorn's limit_concurrency: past it, 503); slow clients each hold
a socket, never a thread."""
KEEPALIVE_S = 75
"""An idle keep-alive connection is closed after this."""
BODY_SLACK = 64 << 20
"""Bodies up to max_upload_bytes + this are read whole so the view answers a JSON 413 (views.DRAIN_LIMIT);
larger ones are refused before they are read (`asgi.FileStoreHandler`)."""
GRACEFUL_S = 5
"""On SIGTERM, connections still open after this are closed: a stalled client must not delay a restart."""

MMAP_THRESHOLD = 4 << 20
TRIM_THRESHOLD = 64 << 20
"""glibc malloc settings for the store (`tune_malloc`): every TLS record, h11 buffer and body block of a
transfer (256 KiB to 1 MiB, allocated and freed thousands of times per blob) then comes from the heap,
instead of a fresh mmap whose pages fault in each time; the heap keeps up to 64 MiB freed at its top.
Measured (5 x 40 MB up, then down; the store's CPU seconds; alternated 3 times, 2-core VM, load 9-14):
1.04-1.24 s up / 0.36-0.37 s down with glibc's defaults, 0.71-0.77 s / 0.28-0.29 s with these."""

log = logging.getLogger("fedsilo.network.filestore")


def tune_malloc() -> bool:
    """Apply `MMAP_THRESHOLD` and `TRIM_THRESHOLD` (glibc only; elsewhere nothing happens: False)."""
    return set_malloc(mmap_threshold=MMAP_THRESHOLD, trim_threshold=TRIM_THRESHOLD)


def uvicorn_options(cfg: NetworkConfig, netdir: Any) -> dict[str, Any]:
    options: dict[str, Any] = {
        "host": cfg.host,
        "port": cfg.http_port,
        "lifespan": "on",  # shutdown closes the worker threads' database connections (asgi.py)
        # h11 (pure Python) bounds a request's headers (16 KiB). httptools 0.9.0 (C) was measured in its place
        # (bench/blobs.py, 40 MB, 2026-11-30 19:41-19:43, load 4-4.9, alternated twice): uploads 0.153-0.171 s
        # against h11's 0.154-0.161 s, downloads 0.130-0.136 s against 0.127 s; no gain, so no new dependency.
        # h11 with bodies of known length past its buffer (protocol.py).
        "http": BodyStreamingProtocol,
        "ws": "none",
        "interface": "asgi3",
        "limit_concurrency": CONNECTION_LIMIT,
        "timeout_keep_alive": KEEPALIVE_S,
        "timeout_graceful_shutdown": GRACEFUL_S,
        "access_log": False,
        "log_config": None,
        "server_header": False,
    }
    if cfg.tls:
        ca, cert, key = ensure_server(network_paths(netdir).pki, [cfg.host, cfg.public_host])
        options |= {
            "ssl_certfile": str(cert),
            "ssl_keyfile": str(key),
            "ssl_ca_certs": str(ca),
            # mutual TLS: a client certificate of the consortium CA, or no connection
            "ssl_cert_reqs": ssl.CERT_REQUIRED if cfg.mutual_tls else ssl.CERT_NONE,
        }
    return options


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fedsilo-filestore", description=__doc__)
    parser.add_argument("netdir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tune_malloc()
    paths = network_paths(args.netdir)
    cfg = load_config(paths.root)
    paths.tmp.mkdir(parents=True, exist_ok=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = CONNECTION_LIMIT + 200
    if soft < want and (hard == resource.RLIM_INFINITY or hard >= want):
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    import uvicorn

    from .asgi import create_asgi_app
    from .retention import gc_forever

    app = create_asgi_app(paths.root, max_body=cfg.max_upload_bytes + BODY_SLACK)
    from django.conf import settings

    stop = threading.Event()
    threading.Thread(
        target=gc_forever, args=(settings.FEDSILO_FILESTORE["gc_interval_s"], stop), name="retention", daemon=True
    ).start()
    server = uvicorn.Server(uvicorn.Config(app, **uvicorn_options(cfg, paths.root)))
    scheme = "https" if cfg.tls else "http"
    log.info("file store serving %s://%s:%s (uvicorn%s)", scheme, cfg.host, cfg.http_port,
             ", mutual TLS" if cfg.mutual_tls else "")  # fmt: skip
    try:
        server.run()
    finally:
        stop.set()
        log.info("file store stopped")


if __name__ == "__main__":
    main(sys.argv[1:])
