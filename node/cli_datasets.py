"""`fedsilo node dataset add|list|show|remove|types`: datasets, with each type's options from the registry.

    fedsilo node dataset add --dir NODE --name adni --tags adni --type csv --path adni.csv --target DX
    fedsilo node dataset types        # every registered type and the options it takes

`add` takes the options every registered type declares (`DatasetType.form_fields`); they are read from
the registry only when `add` runs or shows its help, so other node commands do not import the types.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from fedsilo.common.clitools import friendly_errors, table

from .cli import _actor, _load, dataset, dir_option


class _TypeOptionsCommand(click.Command):
    """A command whose options are completed, on first use, with every dataset type's form fields."""

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        from fedsilo.common.datasets.registry import option_fields

        taken = {opt for p in self.params for opt in getattr(p, "opts", [])}  # a type registered later adds its own
        for f in option_fields().values():
            if f.option not in taken:
                kind = click.Choice(list(f.choices)) if f.kind == "choice" else click.STRING
                owners = ", ".join(_types_with(f.name))
                default = f" (default {f.default})" if f.default else ""
                self.params.append(click.Option([f.option, f.name], type=kind, default=None,
                                                help=f"[{owners}] {f.help or f.label}{default}"))  # fmt: skip
        return super().get_params(ctx)


def _types_with(field_name: str) -> list[str]:
    from fedsilo.common.datasets import types

    return [t.name for t in types() if t.field(field_name) is not None]


@dataset.command("add", cls=_TypeOptionsCommand)
@dir_option
@click.option("--name", required=True)
@click.option("--tags", required=True, help="Comma-separated, e.g. 'mnist,train'.")
@click.option("--type", "data_type", required=True, help="A registered type (`fedsilo node dataset types`).")
@click.option("--path", "path", required=True, type=click.Path(path_type=Path))
@click.option("--description", default="")
@friendly_errors
def dataset_add(
    nodedir: Path, name: str, tags: str, data_type: str, path: Path, description: str, **options: Any
) -> None:
    """Validate and register a dataset (options after --description belong to the types named in brackets)."""
    from .datasets import DatasetStore

    cfg = _load(nodedir)
    store = DatasetStore(cfg.dir, data_roots=cfg.node.data_roots)
    given = {k: v for k, v in options.items() if v is not None}
    rec = store.add(name, tags.split(","), data_type, path, description=description, added_by=_actor(), options=given)
    click.echo(f"added {rec['dataset_id']} '{rec['name']}' shape {rec['shape']} tags {','.join(rec['tags'])}")
    for warning in rec["summary"].get("warnings", []):
        click.echo(f"warning: {warning}", err=True)


@dataset.command("types")
def dataset_types() -> None:
    """The dataset types this node knows, with their options."""
    from fedsilo.common.datasets import types

    for t in types():
        click.echo(f"{t.name}: {t.label} (--path: {t.path_help or t.path_kind})")
        for f in t.form_fields:
            need = "required" if f.required else f"default {f.default}" if f.default else "optional"
            choices = f" [{'|'.join(f.choices)}]" if f.choices else ""
            click.echo(f"  {f.option}{choices} ({need}): {f.help or f.label}")


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
@click.option("--public", is_flag=True, help="Only what researchers see (counts below min_count hidden).")
@friendly_errors
def dataset_show(nodedir: Path, id_or_name: str, public: bool) -> None:
    """The dataset's record (node-side: path, options, full summary), or with --public its description."""
    from .datasets import DatasetStore

    store = DatasetStore(_load(nodedir).dir)
    rec = store.get(id_or_name)
    click.echo(json.dumps(store.info(rec, store.min_count).model_dump() if public else rec, indent=2))


@dataset.command("remove")
@dir_option
@click.argument("id_or_name")
@friendly_errors
def dataset_remove(nodedir: Path, id_or_name: str) -> None:
    """Forget a dataset (files stay on disk)."""
    from .datasets import DatasetStore

    rec = DatasetStore(_load(nodedir).dir).remove(id_or_name, by=_actor())
    click.echo(f"removed {rec['dataset_id']} '{rec['name']}' (files left in place)")
