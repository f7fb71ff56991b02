"""MQTT topic names (see ARCHITECTURE.md)."""

ROOT = "fedsilo/v1"
BROADCAST = f"{ROOT}/nodes"


def node(node_id: str) -> str:
    return f"{ROOT}/node/{node_id}"


def researcher(researcher_id: str) -> str:
    return f"{ROOT}/researcher/{researcher_id}"


def presence(node_id: str) -> str:
    return f"{ROOT}/presence/{node_id}"


PRESENCE_ALL = f"{ROOT}/presence/+"
