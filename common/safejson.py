"""JSON from other parties, parsed only after its size and nesting depth are bounded.

Python's `json` recurses once per nesting level: a 40 KB payload of 20,000 nested arrays raises
RecursionError, which no `except ValueError` catches. Every JSON that crosses a boundary (MQTT
messages, safetensors headers) goes through `check_json` or `loads_bounded` first.

    >>> loads_bounded(b'{"a": [1, 2]}', max_bytes=1024)
    {'a': [1, 2]}
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 32
"""fedsilo's own messages nest at most 5 levels deep (a summary inside a dataset inside a reply)."""

_OPEN = (ord("["), ord("{"))
_CLOSE = (ord("]"), ord("}"))
_QUOTE = ord('"')
_BACKSLASH = ord("\\")


class JSONLimitError(ValueError):
    """The payload is too large or nested too deeply to be parsed safely."""


def json_depth(data: bytes | bytearray | memoryview | str) -> int:
    """The deepest nesting of arrays/objects in `data`, brackets inside strings not counted.

    Linear, no recursion: a Python loop over the bytes (about 40 ms for 256 KiB), so `check_json`
    calls it only when the bracket count, taken in C, could exceed the limit."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == _BACKSLASH:
                escaped = True
            elif byte == _QUOTE:
                in_string = False
        elif byte == _QUOTE:
            in_string = True
        elif byte in _OPEN:
            depth += 1
            deepest = max(deepest, depth)
        elif byte in _CLOSE:
            depth -= 1
    return deepest


def check_json(data: bytes | bytearray | memoryview | str, *, max_bytes: int, max_depth: int = MAX_DEPTH) -> None:
    """Raise `JSONLimitError` if `data` is over `max_bytes` or nested deeper than `max_depth`."""
    if len(data) > max_bytes:
        raise JSONLimitError(f"{len(data)} bytes exceeds the {max_bytes}-byte limit")
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if raw.count(b"[") + raw.count(b"{") <= max_depth:
        return  # there cannot be more levels than brackets
    depth = json_depth(raw)
    if depth > max_depth:
        raise JSONLimitError(f"JSON nested {depth} levels deep exceeds the limit of {max_depth}")


def loads_bounded(data: bytes | bytearray | memoryview | str, *, max_bytes: int, max_depth: int = MAX_DEPTH) -> Any:
    """`json.loads` after `check_json`; every failure is a `ValueError` (`JSONLimitError` or a decode error)."""
    check_json(data, max_bytes=max_bytes, max_depth=max_depth)
    try:
        return json.loads(bytes(data) if isinstance(data, memoryview | bytearray) else data)
    except RecursionError as exc:  # unreachable within MAX_DEPTH; kept so no caller can ever see it
        raise JSONLimitError("JSON nested too deeply") from exc
