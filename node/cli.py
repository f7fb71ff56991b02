"""`fedsilo node ...`: create a node, register datasets, review plans, start the daemon."""

from __future__ import annotations

import getpass
from pathlib import Path

import click

from fedsilo.common.clitools import friendly_errors, table
from fedsilo.common.errors import ConfigError

from .config import NodeConfig, node_paths

dir_option = click.option(
    "--dir",
    "nodedir",
    required=True,
    envvar="FEDSILO_NODE_DIR",
    type=click.Path(file_okay=False, path_type=Path),
    help="Node directory (or $FEDSILO_NODE_DIR).",
)


def _actor(by: str | None = None) -> str:
    return f"cli:{by or getpass.getuser()}"


def _load(nodedir: Path) -> NodeConfig:
    return NodeConfig.load(nodedir)


@click.group()
def node() -> None:
    """Run a hospital node: datasets, plan approval, the node daemon."""


@node.command()
@click.option("--dir", "nodedir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", default=None, help="Node name; also its id on the network (default: the kit's party).")
@click.option(
    "--network",
    "--kit",
    "network",
    required=True,
    type=click.Path(exists=True, path_type=Path),
    help="A startup kit (folder or .tar.gz), a node credentials file, or a network directory (registers this node).",
)
@click.option("--data-root", "data_roots", multiple=True, type=click.Path(path_type=Path), help="Repeatable.")
@click.option("--no-approval", is_flag=True, help="Run plans without approval (not for real data).")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="CPU threads a round may use (default: all). Set it when several nodes share one machine.",
)
@friendly_errors
def init(
    nodedir: Path, name: str | None, network: Path, data_roots: tuple[Path, ...], no_approval: bool, threads: int | None
) -> None:
    """Create a node directory and its credentials."""
    from fedsilo.network.kits import is_kit, load_kit

    from .audit import AuditLog
    from .datasets import DatasetStore
    from .plans import PlanStore

    paths = node_paths(nodedir)
    if paths.config.exists():
        raise ConfigError(f"{paths.root} is already a node directory (config.toml exists)")
    roots = [str(Path(r).expanduser().resolve()) for r in data_roots]
    for r in roots:
        if not Path(r).is_dir():
            raise ConfigError(f"data root '{r}' is not a directory")
    if network.is_dir() and not is_kit(network):
        from fedsilo.network.provision import add_party

        if name is None:
            raise ConfigError("give the node's --name to register it on the network directory")
        creds = add_party(network, name, "node")
    else:
        creds = load_kit(network)  # a kit folder or archive, or a credentials file
        name = name or creds.party
        if creds.role != "node":
            raise ConfigError(f"{network}: credentials for a {creds.role}, not a node")
    cfg = NodeConfig.create(
        paths.root,
        {
            "node": {
                "name": name,
                "node_id": creds.party,
                "require_approval": not no_approval,
                "data_roots": roots,
                **({"threads": threads} if threads else {}),
            }
        },
    )
    paths.root.mkdir(parents=True, exist_ok=True)
    for d in (paths.db, paths.queue, paths.logs):
        d.mkdir(parents=True, exist_ok=True)
    creds.save(paths.network)
    cfg.save()
    DatasetStore(paths.root, data_roots=roots).ensure()
    PlanStore(paths.root).ensure()
    AuditLog(paths.root).ensure()
    click.echo(f"node '{name}' (id {creds.party}) created in {paths.root}")
    click.echo(f"next: fedsilo node dataset add --dir {paths.root} ...; then fedsilo node start --dir {paths.root}")


# ---------------------------------------------------------------------------------------- datasets
@node.group()
def dataset() -> None:
    """Register, list, show and remove datasets."""


from . import cli_dlp  # noqa: E402, F401  (registers `node dataset dlp set|show|clear`)


# ------------------------------------------------------------------------------------------- plans
@node.group()
def plan() -> None:
    """Review training plans: list, show, approve, reject, revoke."""


@plan.command("list")
@dir_option
@click.option("--status", type=click.Choice(["pending", "approved", "rejected"]), default=None)
@friendly_errors
def plan_list(nodedir: Path, status: str | None) -> None:
    from .plans import PlanStore

    rows = PlanStore(_load(nodedir).dir).list(status=status)
    click.echo(
        table(
            ["sha256", "name", "status", "researcher", "first seen", "decided by"],
            [
                [r["sha256"][:16], r["name"], r["status"], r["researcher"], r["first_seen"][:19], r["decided_by"]]
                for r in rows
            ],
        )
    )


@plan.command("show")
@dir_option
@click.argument("sha")
@friendly_errors
def plan_show(nodedir: Path, sha: str) -> None:
    """Print a plan's record and its exact source."""
    from .plans import PlanStore, custom_loop_flag

    cfg = _load(nodedir)
    r = PlanStore(cfg.dir).get(sha)
    for key in ("sha256", "name", "status", "researcher", "description", "first_seen", "decided_by", "note"):
        click.echo(f"{key + ':':13} {r.get(key) or '-'}")
    flag = custom_loop_flag(r, cfg.node.allow_custom_loop)
    if flag:
        click.echo(f"{'warning:':13} {flag}")
    click.echo("-" * 72)
    click.echo(r["source"])


def _decision(verb: str):
    @dir_option
    @click.argument("sha")
    @click.option("--note", default="", help="Why; shown to auditors.")
    @click.option("--by", default=None, help="Who decides (default: your login name).")
    @friendly_errors
    def command(nodedir: Path, sha: str, note: str, by: str | None) -> None:
        from .plans import PlanStore

        store = PlanStore(_load(nodedir).dir)
        rec = getattr(store, verb)(sha, by=_actor(by), note=note)
        click.echo(f"plan {rec['sha256'][:16]} '{rec['name']}' is now {rec['status']}")

    command.__doc__ = {
        "approve": "Approve a plan (hash or unique prefix).",
        "reject": "Reject a pending plan.",
        "revoke": "Withdraw an approval; the next round with this plan is refused.",
    }[verb]
    return command


for _verb in ("approve", "reject", "revoke"):
    plan.command(_verb)(_decision(_verb))

from . import cli_datasets  # noqa: E402, F401  (registers `node dataset add|list|show|remove|types`)


# ------------------------------------------------------------------------------------ config/start
@node.group()
def config() -> None:
    """Inspect the node configuration."""


@config.command("show")
@dir_option
@friendly_errors
def config_show(nodedir: Path) -> None:
    cfg = _load(nodedir)
    click.echo(f"# {cfg.paths.config}")
    click.echo(cfg.paths.config.read_text(encoding="utf-8"))


from . import cli_budget  # noqa: E402, F401  (registers `node budget`, `node dataset budget`)


@node.command()
@dir_option
@friendly_errors
def start(nodedir: Path) -> None:
    """Run the node daemon in the foreground (Ctrl-C or SIGTERM stops it)."""
    from .daemon import run

    run(_load(nodedir))


from . import cli_access  # noqa: E402, F401  (registers `node dataset allow|deny|open|access`)
