"""`fedsilo.researcher` exports everything a notebook needs, and `__all__` says exactly what it exports
(httpx's test_exported_members, adapted): a name defined in the package but missing from `__all__`, or
listed there but not importable, fails."""

from __future__ import annotations

import inspect

import fedsilo.researcher as sdk

NOTEBOOK_NEEDS = {
    "Experiment", "TorchTrainingPlan", "DataManager", "TrainingArgs", "CsvDataset", "ImageFolderDataset",
    "FedAverage", "FedProx", "FedAdam", "FedYogi", "FedAdagrad", "FedMedian", "FedTrimmedAvg", "Krum",
    "MultiKrum", "Scaffold", "FedAlgorithm", "Aggregator", "RemoteError", "RoundFailed", "ExperimentError",
    "DefaultStrategy", "Strategy",
}  # fmt: skip


def test_all_is_exactly_the_public_names() -> None:
    public = {name for name in dir(sdk) if not name.startswith("_") and not inspect.ismodule(getattr(sdk, name))}
    assert set(sdk.__all__) == public, (set(sdk.__all__) ^ public)
    assert sorted(sdk.__all__) == sdk.__all__, "keep __all__ sorted"


def test_everything_a_notebook_needs_is_exported() -> None:
    assert set(sdk.__all__) >= NOTEBOOK_NEEDS, NOTEBOOK_NEEDS - set(sdk.__all__)


def test_public_classes_carry_a_docstring_with_an_example() -> None:
    """An example is an indented code line in the class or its module docstring (httpx's usage blocks)."""
    missing = []
    for name in ("Experiment", "TorchTrainingPlan", "TrainingArgs", "FedAlgorithm", "FedProx", "FedAdam", "Scaffold",
                 "Krum", "DataManager", "Requests", "History"):  # fmt: skip
        obj = getattr(sdk, name)
        docs = (inspect.getdoc(obj) or "") + (inspect.getmodule(obj).__doc__ or "")  # type: ignore[union-attr]
        if not any(line.startswith("    ") and "(" in line for line in docs.splitlines()):
            missing.append(name)
    assert not missing, f"no usage example: {missing}"
