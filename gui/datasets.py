"""Datasets: list, add through a server-side path picker confined to the data roots, edit, remove, and the
data loading plan. Forms and descriptions come from the dataset-type registry (`dataset_forms.py`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Blueprint, abort, flash, g, redirect, render_template, request, url_for
from werkzeug.wrappers import Response

from fedsilo.common.datasets import types
from fedsilo.common.errors import FedsiloError
from fedsilo.node.datasets import DatasetError, UnknownDataset

from .app import ctx, sentence
from .auth import writer_required
from .dataset_forms import (
    BASE_FIELDS,
    chosen_type,
    loading_plan_form,
    loading_plan_text,
    option_values,
    path_fields,
    picker_actions,
    sections,
    size_text,
)

bp = Blueprint("datasets", __name__, url_prefix="/datasets")

# Folders with more entries are cut short in the picker; a data manager navigates, not scrolls.
MAX_ENTRIES = 500


def actor() -> str:
    return f"gui:{g.user['username']}"


def split_tags(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


@bp.route("/")
def index() -> str:
    return render_template("datasets/index.html", datasets=ctx().datasets.list())


@bp.route("/<dataset_id>")
def detail(dataset_id: str) -> str:
    """The record as the node knows it (location, options) and its privacy-safe description, the one
    researchers get in search replies."""
    from fedsilo.node.loading_plans import LoadingPlanStore

    record = _get_or_404(dataset_id)
    description = ctx().datasets.describe(record)
    plan = LoadingPlanStore(ctx().nodedir).get(record["dataset_id"])
    return render_template("datasets/detail.html", ds=record, dtype=chosen_type(record["data_type"]),
                           size=size_text(description), sections=sections(description), plan=plan,
                           plan_form=loading_plan_text(plan))  # fmt: skip


@bp.route("/<dataset_id>/loading-plan", methods=["POST"])
@writer_required
def loading_plan(dataset_id: str) -> Response:
    """Set (or, all fields empty, clear) the dataset's data loading plan; the store audits the change."""
    from fedsilo.node.loading_plans import LoadingPlanStore

    record = _get_or_404(dataset_id)
    try:
        saved = LoadingPlanStore(ctx().nodedir).set(record["dataset_id"], loading_plan_form(request.form), by=actor())
    except FedsiloError as exc:
        flash(f"Loading plan not saved: {sentence(exc)}", "error")
    else:
        flash("Loading plan cleared." if saved.is_empty() else "Loading plan saved.", "success")
    return redirect(url_for("datasets.detail", dataset_id=record["dataset_id"]))


@bp.route("/<dataset_id>/edit", methods=["POST"])
@writer_required
def edit(dataset_id: str) -> Response:
    record = _get_or_404(dataset_id)
    tags = split_tags(request.form.get("tags", ""))
    description = request.form.get("description", "").strip()
    try:
        ctx().datasets.update(record["dataset_id"], tags=tags, description=description, by=actor())
    except DatasetError as exc:
        flash(f"Dataset not changed: {sentence(exc)}", "error")
    else:
        flash(f"Dataset '{record['name']}' updated.", "success")
    return redirect(url_for("datasets.detail", dataset_id=record["dataset_id"]))


@bp.route("/<dataset_id>/remove", methods=["GET", "POST"])
@writer_required
def remove(dataset_id: str) -> str | Response:
    record = _get_or_404(dataset_id)
    if request.method == "GET":
        return render_template("datasets/remove.html", ds=record)
    if request.form.get("confirm_name", "").strip() != record["name"]:
        flash("Type the dataset's name exactly to confirm its removal.", "error")
        return redirect(url_for("datasets.remove", dataset_id=record["dataset_id"]))
    try:
        ctx().datasets.remove(record["dataset_id"], by=actor())
    except DatasetError as exc:
        flash(f"Dataset not removed: {sentence(exc)}", "error")
        return redirect(url_for("datasets.detail", dataset_id=record["dataset_id"]))
    flash(f"Dataset '{record['name']}' removed from the node (its files were not touched).", "success")
    return redirect(url_for("datasets.index"))


@bp.route("/add", methods=["GET", "POST"])
@writer_required
def add() -> str | Response | tuple[str, int]:
    roots = ctx().datasets.data_roots
    form: dict[str, Any] = {k: request.values.get(k, "").strip() for k in BASE_FIELDS}
    dtype = chosen_type(form["data_type"])
    options = option_values(dtype, request.values)
    keep = {k: v for k, v in {**form, **options}.items() if v}
    page = {"form": form, "options": options, "roots": roots, "dtype": dtype, "types": types(), "keep": keep}
    if request.method == "GET":
        return render_template("datasets/add.html", **page)
    errors = []
    if not roots:
        errors.append(
            "this node has no data roots configured, so the GUI cannot add datasets; an administrator "
            "sets [node] data_roots in config.toml or uses `fedsilo node dataset add`"
        )
    if not form["name"]:
        errors.append("give the dataset a name")
    if not split_tags(form["tags"]):
        errors.append("give at least one tag (researchers find datasets by tags)")
    if dtype is None:
        errors.append(f"choose the data type ({', '.join(t.label for t in types())})")
    if not form["path"]:
        errors.append("choose the data with “Browse the data roots”")
    if not errors:
        try:
            picked = confined_path(form["path"])
            for f in path_fields(dtype):
                if f.name in options:
                    options[f.name] = str(confined_path(options[f.name]))
            record = ctx().datasets.add(form["name"], split_tags(form["tags"]), form["data_type"], picked,
                                        description=form["description"], added_by=actor(), options=options)  # fmt: skip
        except DatasetError as exc:
            errors.append(str(exc))
        else:
            flash(f"Dataset '{record['name']}' added ({_size_text(record)}).", "success")
            return redirect(url_for("datasets.detail", dataset_id=record["dataset_id"]))
    for error in errors:
        flash(f"Dataset not added: {sentence(error)}", "error")
    return render_template("datasets/add.html", **page), 400


@dataclass(frozen=True)
class Entry:
    name: str
    path: Path
    is_dir: bool
    actions: tuple[tuple[str, str], ...] = ()


@bp.route("/browse")
@writer_required
def browse() -> str | Response:
    """The path picker: folders and files under the data roots only."""
    roots = ctx().datasets.data_roots
    dtype = chosen_type(request.args.get("data_type", ""))
    keep = {k: v for k, v in {**{k: request.args.get(k, "").strip() for k in BASE_FIELDS},
                              **option_values(dtype, request.args)}.items() if v}  # fmt: skip
    field = request.args.get("field", "path")
    field = field if field == "path" or (dtype is not None and dtype.field(field) is not None) else "path"
    raw = request.args["at"] if "at" in request.args else request.args.get(field, "")
    if not roots:
        flash(
            "This node has no data roots configured; an administrator sets [node] data_roots in config.toml.", "error"
        )
        return render_template("datasets/browse.html", roots=[], here=None, entries=[], keep=keep, crumbs=[],
                               field=field)  # fmt: skip
    if not raw:
        return render_template("datasets/browse.html", roots=roots, here=None, entries=[], keep=keep, crumbs=[],
                               field=field)  # fmt: skip
    try:
        here = confined_path(raw)
    except DatasetError as exc:
        flash(f"Cannot open that location: {sentence(exc)}", "error")
        return redirect(url_for("datasets.browse", **{k: v for k, v in keep.items() if k != field}, field=field))
    if not here.is_dir():
        here = here.parent
    root = next(r for r in roots if here.is_relative_to(r))
    entries, truncated = _list_dir(here, roots, dtype, field, keep)
    if truncated:
        flash(f"This folder holds more than {MAX_ENTRIES} entries; only the first {MAX_ENTRIES} are shown.", "info")
    crumbs = [root, *[p for p in reversed(here.parents) if p.is_relative_to(root) and p != root]]
    if here != root:
        crumbs.append(here)
    here_actions = picker_actions(here, True, dtype, field, keep)
    return render_template("datasets/browse.html", roots=roots, here=here, root=root, entries=entries, keep=keep,
                           crumbs=crumbs, field=field, here_actions=here_actions)  # fmt: skip


def confined_path(raw: str) -> Path:
    """The node's own path check, plus: absolute paths only, no `..` segments, and data roots must exist."""
    if not ctx().datasets.data_roots:
        raise DatasetError("this node has no data roots configured")
    path = Path(raw)
    if not path.is_absolute():
        raise DatasetError(f"'{raw}' is not an absolute path")
    if ".." in path.parts:
        raise DatasetError(f"'{raw}' contains '..'; choose the location with the picker")
    return ctx().datasets.check_path(path)


def _list_dir(here: Path, roots: list[Path], dtype: Any, field: str, keep: dict[str, str]) -> tuple[list[Entry], bool]:
    entries: list[Entry] = []
    try:
        children = sorted(here.iterdir(), key=lambda p: (not p.is_dir(), p.name.lower()))
    except OSError as exc:
        flash(f"Cannot read {here}: {exc.strerror}.", "error")
        return [], False
    for child in children:
        if child.name.startswith("."):
            continue
        try:
            real = child.resolve(strict=True)
        except (OSError, RuntimeError):
            continue
        # A symlink that leads out of the data roots is not offered at all.
        if not any(real.is_relative_to(r) for r in roots):
            continue
        is_dir = real.is_dir()
        entries.append(Entry(child.name, child, is_dir, tuple(picker_actions(child, is_dir, dtype, field, keep))))
        if len(entries) >= MAX_ENTRIES:
            return entries, True
    return entries, False


def _get_or_404(dataset_id: str) -> dict[str, Any]:
    try:
        return ctx().datasets.get(dataset_id)
    except UnknownDataset:
        abort(404, f"No dataset '{dataset_id}' on this node.")


@bp.app_template_filter("dataset_size")
def _size_text(record: dict[str, Any]) -> str:
    return size_text(ctx().datasets.describe(record))


@bp.app_template_filter("dataset_type_label")
def _type_label(name: str) -> str:
    dtype = chosen_type(name)
    return dtype.label if dtype is not None else name


@bp.app_template_filter("dataset_contents")
def _contents(record: dict[str, Any]) -> str:
    """The names in the first table of the description (columns, classes or modalities)."""
    tables = [s for s in sections(ctx().datasets.describe(record)) if s.get("rows")]
    return ", ".join(str(row[0]) for row in tables[0]["rows"]) if tables else ""
