"""`fedsilo node ...`: create a node, register datasets, review plans, start the daemon."""

from __future__ import annotations

import getpass
import json
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


@dataset.command("add")
@dir_option
@click.option("--name", required=True)
@click.option("--tags", required=True, help="Comma-separated, e.g. 'mnist,train'.")
@click.option("--type", "data_type", required=True, type=click.Choice(["csv", "images"]))
@click.option("--path", "path", required=True, type=click.Path(path_type=Path))
@click.option("--description", default="")
@click.option("--target", default=None, help="CSV target column (checked to exist).")
@click.option(
    "--missing",
    type=click.Choice(["refuse", "keep"]),
    default="refuse",
    show_default=True,
    help="CSV cells that are empty, NA, NaN or infinite: refuse the file (the error counts them per column), "
    "or keep them with a warning in the summary researchers see (the training plan must handle them).",
)
@friendly_errors
def dataset_add(
    nodedir: Path,
    name: str,
    tags: str,
    data_type: str,
    path: Path,
    description: str,
    target: str | None,
    missing: str,
) -> None:
    """Validate and register a dataset."""
    from .datasets import DatasetStore

    cfg = _load(nodedir)
    store = DatasetStore(cfg.dir, data_roots=cfg.node.data_roots)
    rec = store.add(
        name, tags.split(","), data_type, path, description=description, added_by=_actor(), target=target,
        missing=missing,
    )  # fmt: skip
    click.echo(f"added {rec['dataset_id']} '{rec['name']}' shape {rec['shape']} tags {','.join(rec['tags'])}")
    for warning in rec["summary"].get("warnings", []):
        click.echo(f"warning: {warning}", err=True)


@dataset.command("list")
@dir_option
@friendly_errors
def dataset_list(nodedir: Path) -> None:
    from .datasets import DatasetStore

    rows = DatasetStore(_load(nodedir).dir).list()
    click.echo(
        table(
            ["id", "name", "type", "tags", "shape", "added"],
            [[r["dataset_id"], r["name"], r["data_type"], r["tags"], r["shape"], r["added_at"][:19]] for r in rows],
        )
    )


@dataset.command("show")
@dir_option
@click.argument("id_or_name")
@friendly_errors
def dataset_show(nodedir: Path, id_or_name: str) -> None:
    from .datasets import DatasetStore

    rec = DatasetStore(_load(nodedir).dir).get(id_or_name)
    click.echo(json.dumps(rec, indent=2))


@dataset.command("remove")
@dir_option
@click.argument("id_or_name")
@friendly_errors
def dataset_remove(nodedir: Path, id_or_name: str) -> None:
    """Forget a dataset (files stay on disk)."""
    from .datasets import DatasetStore

    rec = DatasetStore(_load(nodedir).dir).remove(id_or_name, by=_actor())
    click.echo(f"removed {rec['dataset_id']} '{rec['name']}' (files left in place)")


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


@node.command()
@dir_option
@friendly_errors
def start(nodedir: Path) -> None:
    """Run the node daemon in the foreground (Ctrl-C or SIGTERM stops it)."""
    from .daemon import run

    run(_load(nodedir))
