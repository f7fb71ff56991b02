"""Helpers every command group uses: one-line errors, readable tables."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import click

from .errors import FedsiloError


def friendly_errors(func: Callable) -> Callable:
    """Turn expected failures into one clear line on stderr and exit status 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (FedsiloError, OSError, ValueError) as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], max_width: int = 60) -> str:
    """Render rows as an aligned plain-text table (stable in logs, readable in a terminal)."""
    cells = [[_cell(h, max_width) for h in headers]]
    cells += [[_cell(v, max_width) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True)).rstrip(), line]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells[1:]]
    if len(cells) == 1:
        out.append("(none)")
    return "\n".join(out)


def _cell(value: Any, max_width: int) -> str:
    if value is None:
        text = "-"
    elif isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, list | tuple):
        text = ",".join(str(v) for v in value)
    else:
        text = str(value)
    text = text.replace("\n", " ")
    return text if len(text) <= max_width else text[: max_width - 1] + "…"
