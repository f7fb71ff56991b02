"""What the dataset pages build from the type registry: the add form's fields, the picker's actions, the
privacy-safe description as tables, and the loading-plan form. No dataset type is named here.

    fields_of(get("csv"))            # [FormField("target", ...), ...] rendered by datasets/add.html
    picker_actions(entry, None, "path", keep)   # [("Use this CSV file", url), ...] for one picker row
    sections(store.describe(record)) # [{"title": "Columns", "headers": [...], "rows": [...]}, ...]
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flask import url_for

from fedsilo.common.datasets import DatasetType, FormField, UnknownDatasetType, get, types

BASE_FIELDS = ("name", "tags", "data_type", "path", "description")


def chosen_type(name: str) -> DatasetType | None:
    try:
        return get(name) if name else None
    except UnknownDatasetType:
        return None


def option_values(dtype: DatasetType | None, values: Mapping[str, str]) -> dict[str, str]:
    """The chosen type's options as typed in the form (stripped, empty ones left out)."""
    if dtype is None:
        return {}
    return {f.name: values.get(f.name, "").strip() for f in dtype.form_fields if values.get(f.name, "").strip()}


def path_fields(dtype: DatasetType | None) -> list[FormField]:
    return [f for f in (dtype.form_fields if dtype else ()) if f.kind in ("path", "file")]


def picker_actions(
    path: Path, is_dir: bool, dtype: DatasetType | None, field: str, keep: Mapping[str, str]
) -> list[tuple[str, str]]:
    """(link text, URL) for choosing `path` in the picker: for the dataset's location, each type that accepts
    it (only the chosen one once a type is chosen); for a type's path/file option, that option."""
    if field == "path":
        candidates = [dtype] if dtype is not None else types()
        return [(t.pick_label, url_for("datasets.add", **{**keep, "path": str(path), "data_type": t.name}))
                for t in candidates if t.accepts(path, is_dir)]  # fmt: skip
    option = dtype.field(field) if dtype is not None else None
    if option is None or (option.kind == "file" and is_dir):
        return []
    text = "Use this folder" if is_dir else "Use this file"
    return [(f"{text} as {option.label.lower()}", url_for("datasets.add", **{**keep, field: str(path)}))]


def size_text(description: Mapping[str, Any]) -> str:
    """'120 samples' (or '< 5 samples'), with the shape when it is published."""
    shape = description.get("shape") or []
    text = f"{description.get('samples', '?')} samples"
    return text + (f", shape {' × '.join(str(n) for n in shape)}" if shape else "")


def sections(description: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The description as facts (scalars and lists) and tables (mappings): a mapping of mappings becomes a
    table with one row per key and the union of the inner keys as columns."""
    facts: list[tuple[str, str]] = []
    tables: list[dict[str, Any]] = []
    for key, value in description.items():
        title = key.replace("_", " ").capitalize()
        if isinstance(value, Mapping) and value and all(isinstance(v, Mapping) for v in value.values()):
            headers: list[str] = []
            for inner in value.values():
                headers += [h for h in inner if h not in headers]
            rows = [[name, *[_text(inner.get(h, "")) for h in headers]] for name, inner in value.items()]
            tables.append({"title": title, "headers": [_singular(key).capitalize(), *headers], "rows": rows})
        elif isinstance(value, Mapping):
            tables.append({"title": title, "headers": ["", ""], "rows": [[k, _text(v)] for k, v in value.items()]})
        else:
            facts.append((title, _text(value)))
    return [{"title": "", "facts": facts}, *tables] if facts else tables


def _singular(word: str) -> str:
    """'modalities' -> 'modality', 'columns' -> 'column' (table headers)."""
    return word[:-3] + "y" if word.endswith("ies") else word[:-1] if word.endswith("s") else word


def _text(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {_text(v)}" for k, v in value.items()) or "—"
    if isinstance(value, list | tuple):
        if value and all(isinstance(v, int | float) for v in value):
            return " × ".join(f"{v:g}" for v in value)
        return ", ".join(_text(v) for v in value) or "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def loading_plan_form(values: Mapping[str, str]) -> dict[str, Any]:
    """The loading-plan form as a DataLoadingPlan dict: one LOCAL=SERVED pair per line (or comma)."""
    from fedsilo.common.datasets.loading_plan import label_value, parse_pairs

    def pairs(name: str) -> dict[str, str]:
        lines = [item for item in values.get(name, "").replace(",", "\n").splitlines() if item.strip()]
        return parse_pairs(lines, name.replace("_", " "))

    return {
        "aliases": pairs("aliases"),
        "renames": pairs("renames"),
        "label_map": {k: label_value(v) for k, v in pairs("label_map").items()},
        "missing": values.get("missing") or None,
    }


def loading_plan_text(plan: Any | None) -> dict[str, str]:
    """A stored plan back into the form's fields."""
    if plan is None:
        return {"aliases": "", "renames": "", "label_map": "", "missing": ""}
    lines = {k: "\n".join(f"{a}={b}" for a, b in getattr(plan, k).items()) for k in ("aliases", "renames", "label_map")}
    return {**lines, "missing": plan.missing or ""}
