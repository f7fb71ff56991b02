"""Process helpers for tests: the package's own launchers (one implementation for quickstart,
benchmarks and tests), re-exported under short names.

    net = start_network(tmp_path)            # free ports, waits until state.json says READY
    creds = net.credentials("researcher")    # fedsilo.network.credentials.Credentials
    node = start_node(nodedir)               # waits until the daemon is connected
"""

from fedsilo.common.processes import FEDSILO, free_port, log_tail, start_process, stop_process, wait_until
from fedsilo.network.launcher import NetworkHandle, start_network
from fedsilo.node.launcher import NodeHandle, daemon_connected, start_node

__all__ = [
    "FEDSILO",
    "NetworkHandle",
    "NodeHandle",
    "daemon_connected",
    "free_port",
    "log_tail",
    "start_network",
    "start_node",
    "start_process",
    "stop_process",
    "wait_until",
]
