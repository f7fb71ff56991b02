"""The `fedsilo` command. Each component contributes a group through the `fedsilo.commands` entry point."""

from __future__ import annotations

import logging
from importlib.metadata import entry_points

import click

from . import __version__


class _LazyGroup(click.Group):
    def _commands(self) -> dict[str, object]:
        return {ep.name: ep for ep in entry_points(group="fedsilo.commands")}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(self._commands())

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        ep = self._commands().get(name)
        return ep.load() if ep is not None else None


@click.group(cls=_LazyGroup)
@click.version_option(__version__, prog_name="fedsilo")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """fedsilo: federated learning where hospitals keep their data."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main() -> None:
    cli(prog_name="fedsilo")
