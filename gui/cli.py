"""`fedsilo gui`: serve the data managers' web application and manage its accounts."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from fedsilo.common.clitools import friendly_errors, table

from .users import ROLES, UserStore

_DIR = click.option(
    "--dir",
    "nodedir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The node directory (made by `fedsilo node init`).",
)


@click.group()
def gui() -> None:
    """The web GUI where data managers review plans and datasets."""


@gui.command()
@_DIR
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8484, show_default=True, type=click.IntRange(0, 65535), help="TCP port.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 32), help="Worker processes.")
@click.option("--certfile", type=click.Path(dir_okay=False, exists=True), help="TLS certificate (PEM).")
@click.option("--keyfile", type=click.Path(dir_okay=False, exists=True), help="TLS private key (PEM).")
@click.option(
    "--secure-cookies/--no-secure-cookies",
    default=None,
    help="Send the session cookie over HTTPS only (default: on when --certfile is given; "
    "turn on behind a TLS reverse proxy).",
)
@friendly_errors
def start(
    nodedir: Path,
    host: str,
    port: int,
    workers: int,
    certfile: str | None,
    keyfile: str | None,
    secure_cookies: bool | None,
) -> None:
    """Serve the GUI under gunicorn until interrupted."""
    from .server import serve

    if bool(certfile) != bool(keyfile):
        raise click.UsageError("--certfile and --keyfile go together")
    secure = bool(certfile) if secure_cookies is None else secure_cookies
    serve(nodedir, host=host, port=port, workers=workers, certfile=certfile, keyfile=keyfile, secure_cookies=secure)


@gui.group()
def user() -> None:
    """Accounts that may log in to the GUI."""


@user.command("add")
@_DIR
@click.argument("username")
@click.option("--role", type=click.Choice(ROLES), default="data_manager", show_default=True)
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input (for scripts).")
@friendly_errors
def user_add(nodedir: Path, username: str, role: str, password_stdin: bool) -> None:
    """Create an account (asks for its password)."""
    _require_nodedir(nodedir)
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    UserStore(nodedir).add(username, password, role)
    click.echo(f"user '{username}' added with role {role}")


@user.command("list")
@_DIR
@friendly_errors
def user_list(nodedir: Path) -> None:
    """Show the accounts and their roles."""
    _require_nodedir(nodedir)
    rows = [(u["username"], u["role"], u["created_at"], u.get("last_login")) for u in UserStore(nodedir).list()]
    click.echo(table(["username", "role", "created", "last login"], rows))


@user.command("remove")
@_DIR
@click.argument("username")
@friendly_errors
def user_remove(nodedir: Path, username: str) -> None:
    """Delete an account."""
    _require_nodedir(nodedir)
    UserStore(nodedir).remove(username)
    click.echo(f"user '{username}' removed")


@user.command("set-role")
@_DIR
@click.argument("username")
@click.argument("role", type=click.Choice(ROLES))
@friendly_errors
def user_set_role(nodedir: Path, username: str, role: str) -> None:
    """Change an account's role."""
    _require_nodedir(nodedir)
    UserStore(nodedir).set_role(username, role)
    click.echo(f"user '{username}' now has role {role}")


@user.command("set-password")
@_DIR
@click.argument("username")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input (for scripts).")
@friendly_errors
def user_set_password(nodedir: Path, username: str, password_stdin: bool) -> None:
    """Reset an account's password (its open sessions end)."""
    _require_nodedir(nodedir)
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("New password", hide_input=True, confirmation_prompt=True)
    UserStore(nodedir).set_password(username, password)
    click.echo(f"password of '{username}' changed")


def _require_nodedir(nodedir: Path) -> None:
    if not (nodedir / "config.toml").is_file():
        raise click.ClickException(f"{nodedir}: not a node directory (no config.toml); run `fedsilo node init` first")
