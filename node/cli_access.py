"""`fedsilo node dataset allow|deny|open|access`: which researchers may use a dataset (`node/access.py`).

    fedsilo node dataset allow --dir NODE heart-2024 r1 r2    # only r1 and r2 from now on
    fedsilo node dataset deny  --dir NODE heart-2024 r2       # r2 refused (FS210)
    fedsilo node dataset open  --dir NODE heart-2024          # every researcher the node takes
    fedsilo node dataset access --dir NODE                    # the rules, and the node's researcher list
"""

from __future__ import annotations

from pathlib import Path

import click

from fedsilo.common.clitools import friendly_errors, table

from .cli import _actor, dataset, dir_option


def _dataset_id(nodedir: Path, id_or_name: str) -> str:
    from .datasets import DatasetStore

    return DatasetStore(nodedir).get(id_or_name)["dataset_id"]


def _show(rule: dict | None) -> str:
    if rule is None:
        return "open to every researcher this node takes"
    allow = "every researcher this node takes" if rule["allow"] is None else ", ".join(rule["allow"]) or "nobody"
    deny = f"; denied: {', '.join(rule['deny'])}" if rule["deny"] else ""
    return f"allowed: {allow}{deny}"


def _change(nodedir: Path, id_or_name: str, verb: str, researchers: tuple[str, ...]) -> None:
    """`DatasetAccess.allow` or `.deny` on the dataset, then its rule as it now reads."""
    from .access import DatasetAccess

    dataset_id = _dataset_id(nodedir, id_or_name)
    rule = getattr(DatasetAccess(nodedir), verb)(dataset_id, researchers, by=_actor())
    click.echo(f"{dataset_id}: {_show(rule)}")


@dataset.command("allow")
@dir_option
@click.argument("id_or_name")
@click.argument("researchers", nargs=-1, required=True)
@friendly_errors
def dataset_allow(nodedir: Path, id_or_name: str, researchers: tuple[str, ...]) -> None:
    """Let RESEARCHERS use the dataset; once a dataset has an allow-list, only listed researchers may."""
    _change(nodedir, id_or_name, "allow", researchers)


@dataset.command("deny")
@dir_option
@click.argument("id_or_name")
@click.argument("researchers", nargs=-1, required=True)
@friendly_errors
def dataset_deny(nodedir: Path, id_or_name: str, researchers: tuple[str, ...]) -> None:
    """Refuse RESEARCHERS on the dataset, whatever its allow-list says."""
    _change(nodedir, id_or_name, "deny", researchers)


@dataset.command("open")
@dir_option
@click.argument("id_or_name")
@friendly_errors
def dataset_open(nodedir: Path, id_or_name: str) -> None:
    """Remove the dataset's rule: every researcher the node takes may use it."""
    from .access import DatasetAccess

    dataset_id = _dataset_id(nodedir, id_or_name)
    DatasetAccess(nodedir).open(dataset_id, by=_actor())
    click.echo(f"{dataset_id}: {_show(None)}")


@dataset.command("access")
@dir_option
@friendly_errors
def dataset_access(nodedir: Path) -> None:
    """Show the node's researcher list and each dataset's rule."""
    from .access import DatasetAccess
    from .config import NodeConfig
    from .datasets import DatasetStore

    researchers = NodeConfig.load(nodedir).node.researchers
    click.echo("node takes: " + ("every researcher in the roster" if researchers is None
                                 else ", ".join(researchers) or "no researcher"))  # fmt: skip
    access = DatasetAccess(nodedir)
    rows = [[r["dataset_id"], r["name"], _show(access.rule(r["dataset_id"]))] for r in DatasetStore(nodedir).list()]
    click.echo(table(["dataset_id", "name", "access"], rows))
