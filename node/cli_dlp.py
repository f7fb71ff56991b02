"""`fedsilo node dataset dlp set|show|clear`: a dataset's data loading plan (`node/loading_plans.py`).

    fedsilo node dataset dlp set   --dir NODE prostate --alias T1=T1w --label-map 2=1 --missing drop
    fedsilo node dataset dlp set   --dir NODE prostate --rename Age=age      # added to the plan above
    fedsilo node dataset dlp set   --dir NODE prostate --replace --alias T1=T1w
    fedsilo node dataset dlp show  --dir NODE prostate
    fedsilo node dataset dlp clear --dir NODE prostate

`set` adds the given entries to the dataset's plan (`--replace` starts from an empty one); the whole plan
is then checked against the dataset, and nothing is stored when an entry does not fit.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from fedsilo.common.clitools import friendly_errors

from .cli import _actor, dataset, dir_option

if TYPE_CHECKING:
    from fedsilo.common.datasets.loading_plan import DataLoadingPlan


@dataset.group("dlp")
def dlp() -> None:
    """A dataset's data loading plan: aliases, renames, label map, missing-value policy."""


def _pairs(values: tuple[str, ...], option: str) -> dict[str, str]:
    from fedsilo.common.datasets.loading_plan import DataLoadingPlanError, parse_pairs

    try:
        return parse_pairs(values, option)
    except DataLoadingPlanError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


def _label(value: str) -> int | float | str:
    from fedsilo.common.datasets.loading_plan import label_value

    return label_value(value)


def describe_plan(plan: DataLoadingPlan | None) -> str:
    """The plan as the CLI prints it: one line per customisation."""
    if plan is None:
        return "no data loading plan: plans read the files as they are"
    lines = []
    for title, mapping in (("alias", plan.aliases), ("rename", plan.renames), ("label", plan.label_map)):
        lines += [f"{title:<8}{local} -> {served}" for local, served in mapping.items()]
    if plan.missing:
        lines.append(f"missing {plan.missing}")
    return "\n".join(lines)


@dlp.command("set")
@dir_option
@click.argument("id_or_name")
@click.option("--alias", "aliases", multiple=True, help="LOCAL=SERVED modality name, e.g. T1=T1w. Repeatable.")
@click.option("--rename", "renames", multiple=True, help="LOCAL=SERVED column name. Repeatable.")
@click.option("--label-map", "labels", multiple=True, help="LOCAL=SERVED label value, e.g. 2=1. Repeatable.")
@click.option("--missing", type=click.Choice(["drop", "refuse", "keep"]), default=None,
              help="Subjects or rows with a missing value: leave out, fail the round, or keep as NaN.")
@click.option("--replace", is_flag=True, help="Start from an empty plan instead of adding to the current one.")
@click.option("--by", default=None, help="Who sets it (default: your login), for the activity log.")
@friendly_errors
def dlp_set(nodedir: Path, id_or_name: str, aliases: tuple[str, ...], renames: tuple[str, ...],
            labels: tuple[str, ...], missing: str | None, replace: bool, by: str | None) -> None:  # fmt: skip
    """Set or extend the data loading plan of dataset ID_OR_NAME."""
    from fedsilo.common.datasets.loading_plan import DataLoadingPlan

    from .loading_plans import LoadingPlanStore

    store = LoadingPlanStore(nodedir)
    current = (None if replace else store.get(id_or_name)) or DataLoadingPlan()
    plan = current.merged(
        aliases={**current.aliases, **_pairs(aliases, "--alias")},
        renames={**current.renames, **_pairs(renames, "--rename")},
        label_map={**current.label_map, **{k: _label(v) for k, v in _pairs(labels, "--label-map").items()}},
        missing=missing or current.missing,
    )
    saved = store.set(id_or_name, plan, by=_actor(by))
    click.echo(describe_plan(None if saved.is_empty() else saved))


@dlp.command("show")
@dir_option
@click.argument("id_or_name")
@friendly_errors
def dlp_show(nodedir: Path, id_or_name: str) -> None:
    """Print the data loading plan of dataset ID_OR_NAME."""
    from .loading_plans import LoadingPlanStore

    click.echo(describe_plan(LoadingPlanStore(nodedir).get(id_or_name)))


@dlp.command("clear")
@dir_option
@click.argument("id_or_name")
@click.option("--by", default=None, help="Who clears it (default: your login), for the activity log.")
@friendly_errors
def dlp_clear(nodedir: Path, id_or_name: str, by: str | None) -> None:
    """Remove the data loading plan of dataset ID_OR_NAME (plans then read the files as they are)."""
    from .loading_plans import LoadingPlanStore

    cleared = LoadingPlanStore(nodedir).clear(id_or_name, by=_actor(by))
    click.echo("cleared" if cleared else "the dataset had no data loading plan")
