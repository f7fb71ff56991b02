"""MQTT topic names (see ARCHITECTURE.md and docs/internals.md).

The last level of a request or reply topic names the party that published it, and the broker's ACL lets
each party publish only under its own name. MQTT 3.1.1 tells a subscriber nothing about who published a
message; the topic does, so a receiver checks that a message's `sender`/`node_id` matches its topic and
a lie about identity is refused and logged instead of believed.

    fedsilo/v1/nodes/<researcher>              broadcast requests   (nodes read; a researcher writes its own)
    fedsilo/v1/node/<node>/<researcher>        requests to one node
    fedsilo/v1/researcher/<researcher>/<node>  replies and events   (a node writes its own)
    fedsilo/v1/presence/<node>                 retained presence    (a node writes its own)
"""

from __future__ import annotations

ROOT = "fedsilo/v1"
_BROADCAST = f"{ROOT}/nodes"


def broadcast(researcher_id: str) -> str:
    """Requests from `researcher_id` to every node."""
    return f"{_BROADCAST}/{researcher_id}"


def node(node_id: str, researcher_id: str) -> str:
    """Requests from `researcher_id` to `node_id`."""
    return f"{ROOT}/node/{node_id}/{researcher_id}"


def researcher(researcher_id: str, node_id: str) -> str:
    """Replies and events from `node_id` to `researcher_id`."""
    return f"{ROOT}/researcher/{researcher_id}/{node_id}"


def presence(node_id: str) -> str:
    return f"{ROOT}/presence/{node_id}"


BROADCAST_ALL = broadcast("+")
PRESENCE_ALL = presence("+")
ROSTER = f"{ROOT}/roster"
"""The consortium's roster, signed by its authority (retained; only the network's `_monitor` party writes it)."""


def node_inbox(node_id: str) -> str:
    """What a node subscribes to besides `BROADCAST_ALL`: requests from any researcher."""
    return node(node_id, "+")


def researcher_inbox(researcher_id: str) -> str:
    """What a researcher subscribes to besides `PRESENCE_ALL`: replies from any node."""
    return researcher(researcher_id, "+")


def publisher(topic: str) -> str:
    """The party that published on a request, reply or presence topic (its last level), or "" if none."""
    levels = topic.split("/")
    if len(levels) < 4 or "/".join(levels[:2]) != ROOT:
        return ""
    kind = levels[2]
    if kind == "nodes" and len(levels) == 4:
        return levels[3]
    if kind in ("node", "researcher") and len(levels) == 5:
        return levels[4]
    if kind == "presence" and len(levels) == 4:
        return levels[3]
    return ""
