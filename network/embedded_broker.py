"""The embedded MQTT broker (amqtt) as a process of its own, started by `fedsilo network start`:

    python -m fedsilo.network.embedded_broker --dir NETDIR [--standby]

It used to run on a thread inside `network start`; as a child process it is supervised exactly like
Mosquitto (a kill -9 of the broker is the same event on both, and is restarted on the same port).
It authenticates against `parties.json`, re-read whenever the file changes (no reload needed).
Logs go to stderr, which its parent points at `NETDIR/broker/broker.log`. With `--standby` it waits,
its imports done, until its stdin says `go` (a spare, ready to replace a crashed broker within
milliseconds), and exits quietly at end of input (its parent is gone).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from .broker import PartiesAuthPlugin, PartiesTopicPlugin, _fedsilo_broker_class, server_context
from .provision import NetworkConfig, load_config, network_paths

log = logging.getLogger("fedsilo.network.embedded_broker")


def amqtt_config(netdir: str | Path, cfg: NetworkConfig) -> dict[str, Any]:
    """amqtt's configuration: one TCP listener, fedsilo's authentication and topic ACL plugins."""
    parties = str(network_paths(netdir).parties)
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{cfg.host}:{cfg.mqtt_port}", "ssl": cfg.tls}},
        "timeout_disconnect_delay": 0,
        "plugins": {
            f"{plugin.__module__}.{plugin.__qualname__}": {"parties_file": parties}
            for plugin in (PartiesAuthPlugin, PartiesTopicPlugin)
        },
    }


async def serve(netdir: str | Path) -> None:
    """Run the broker until SIGTERM or SIGINT, then shut it down (its clients see a disconnect)."""
    paths = network_paths(netdir)
    cfg = load_config(paths.root)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tls = server_context(paths.root, cfg) if cfg.tls else None
    broker = _fedsilo_broker_class()(amqtt_config(paths.root, cfg), loop=loop, tls_context=tls)
    await broker.start()
    log.info("embedded broker listening on %s:%s", cfg.host, cfg.mqtt_port)
    await stop.wait()
    log.info("stopping")
    try:
        await asyncio.wait_for(broker.shutdown(), 10)
    except Exception:  # exiting anyway: the process going away closes every connection
        log.warning("the broker did not shut down cleanly", exc_info=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedsilo.network.embedded_broker", description=__doc__)
    parser.add_argument("--dir", required=True, help="network directory")
    parser.add_argument("--standby", action="store_true", help="wait for a line `go` on stdin first")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.standby and sys.stdin.readline().strip() != "go":
        return
    asyncio.run(serve(args.dir))


if __name__ == "__main__":
    main()
