"""plan_source: class + used imports + dependencies, stable hash, safe loading back."""

from __future__ import annotations

import importlib
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch

from fedsilo.common.errors import PlanSourceError
from fedsilo.common.plan_source import load_plan_class, plan_hash, plan_source
from fedsilo.common.training_plan import TorchTrainingPlan

PLAN_MODULE = '''
"""A researcher's module."""
import json
import os.path
import numpy as np
import torch.nn as tnn
from torch import optim
from torch.nn import functional as F, Linear
from fedsilo.common.training_plan import TorchTrainingPlan

UNUSED = json.dumps({})


class Net(TorchTrainingPlan):
    """Logistic regression."""

    def init_dependencies(self):
        return ["import math"]

    def init_model(self, model_args):
        return tnn.Sequential(Linear(model_args["n_features"], 2))

    def init_optimizer(self, optimizer_args):
        return optim.SGD(self.model().parameters(), lr=optimizer_args.get("lr", 0.1) * math.sqrt(1.0))

    def training_step(self, data, target):
        return F.cross_entropy(self.model()(data), target)
'''


def _import_module(tmp_path: Path, text: str) -> object:
    name = f"plan_mod_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(text), encoding="utf-8")
    sys.path.insert(0, str(tmp_path))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(tmp_path))


def test_module_class_ships_only_used_imports(tmp_path: Path) -> None:
    mod = _import_module(tmp_path, PLAN_MODULE)
    src = plan_source(mod.Net)
    assert "class Net(TorchTrainingPlan):" in src
    assert "import torch.nn as tnn" in src  # aliased import kept with its alias
    assert "from torch.nn import Linear, functional as F" in src
    assert "from torch import optim" in src
    assert "from fedsilo.common.training_plan import TorchTrainingPlan" in src
    assert "import math" in src  # init_dependencies line
    assert "json" not in src and "numpy" not in src and "os.path" not in src
    assert "UNUSED" not in src


def test_output_is_deterministic_and_loads_back(tmp_path: Path) -> None:
    mod = _import_module(tmp_path, PLAN_MODULE)
    first, second = plan_source(mod.Net), plan_source(mod.Net)
    assert first == second and plan_hash(first) == plan_hash(second)
    cls = load_plan_class(first, "Net")
    assert issubclass(cls, TorchTrainingPlan)
    plan = cls()
    plan.post_init({"n_features": 3}, {"optimizer_args": {"lr": 0.5}})
    loss = plan.training_step(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))
    assert loss.ndim == 0
    # Extracting again from the loaded class gives the same text: a resumed plan keeps its hash.
    assert plan_source(cls) == first


def test_one_character_edit_changes_the_hash(tmp_path: Path) -> None:
    a = plan_source(_import_module(tmp_path, PLAN_MODULE).Net)
    b = plan_source(_import_module(tmp_path, PLAN_MODULE.replace("0.1)", "0.2)")).Net)
    assert a != b
    assert plan_hash(a) != plan_hash(b)
    assert len(plan_hash(a)) == 64


def test_import_order_in_module_does_not_change_the_text(tmp_path: Path) -> None:
    swapped = PLAN_MODULE.replace(
        "import torch.nn as tnn\nfrom torch import optim\n", "from torch import optim\nimport torch.nn as tnn\n"
    )
    assert swapped != PLAN_MODULE
    assert plan_source(_import_module(tmp_path, PLAN_MODULE).Net) == plan_source(_import_module(tmp_path, swapped).Net)


def test_module_level_helper_is_refused_with_advice(tmp_path: Path) -> None:
    mod = _import_module(
        tmp_path,
        """
        from torch import nn
        from fedsilo.common.training_plan import TorchTrainingPlan

        HIDDEN = 8

        class Net(TorchTrainingPlan):
            def init_model(self, model_args):
                return nn.Linear(HIDDEN, 1)
        """,
    )
    with pytest.raises(PlanSourceError, match="HIDDEN"):
        plan_source(mod.Net)


def test_bad_dependency_line_is_refused(tmp_path: Path) -> None:
    mod = _import_module(
        tmp_path,
        """
        from fedsilo.common.training_plan import TorchTrainingPlan

        class Net(TorchTrainingPlan):
            def init_dependencies(self):
                return ["print('hello')"]
        """,
    )
    with pytest.raises(PlanSourceError, match="not an import statement"):
        plan_source(mod.Net)


def test_load_refuses_non_plans_and_reports_errors() -> None:
    with pytest.raises(PlanSourceError, match="not a subclass"):
        load_plan_class("class Net:\n    pass\n", "Net")
    with pytest.raises(PlanSourceError, match="no class named 'Other'"):
        load_plan_class("class Net:\n    pass\n", "Other")
    with pytest.raises(PlanSourceError, match="line 1"):
        load_plan_class("class Net(:\n", "Net")
    with pytest.raises(PlanSourceError, match="ModuleNotFoundError"):
        load_plan_class("import no_such_module_here\n", "Net")


def test_class_defined_in_exec_cell_like_ipython() -> None:
    """Simulates IPython: code compiled from a cell file name that only lives in linecache."""
    import linecache

    cells = [
        "import torch.nn as tnn\nfrom fedsilo.common.training_plan import TorchTrainingPlan\n",
        "class CellNet(TorchTrainingPlan):\n    def init_model(self, model_args):\n        return tnn.Linear(2, 1)\n",
        "class CellNet(TorchTrainingPlan):\n    def init_model(self, model_args):\n        return tnn.Linear(3, 1)\n",
    ]
    namespace: dict = {"__name__": "__main__"}
    for i, cell in enumerate(cells):
        filename = f"/tmp/ipykernel_424242/{uuid.uuid4().int % 10**9}_{i}.py"
        linecache.cache[filename] = (len(cell), None, cell.splitlines(keepends=True), filename)
        exec(compile(cell, filename, "exec"), namespace)
    src = plan_source(namespace["CellNet"])
    assert "tnn.Linear(3, 1)" in src and "tnn.Linear(2, 1)" not in src
    assert "import torch.nn as tnn" in src
    assert load_plan_class(src, "CellNet")().init_model({}).in_features == 3


def test_class_defined_in_a_real_jupyter_cell() -> None:
    """Python 3.11 `inspect.getsource` fails for notebook classes; the cell cache must be used."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("from torch import nn as tnn\nimport numpy as np"),
        nbformat.v4.new_code_cell(
            "from fedsilo.common.training_plan import TorchTrainingPlan\n"
            "class NbNet(TorchTrainingPlan):\n"
            "    def init_model(self, model_args):\n"
            "        return tnn.Linear(model_args['n'], 1)\n"
        ),
        nbformat.v4.new_code_cell(
            "from fedsilo.common.plan_source import plan_source, load_plan_class\n"
            "src = plan_source(NbNet)\n"
            "assert load_plan_class(src, 'NbNet')().init_model({'n': 4}).in_features == 4\n"
            "print(src)"
        ),
    ]
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    out = "".join(o.get("text", "") for o in nb.cells[2].outputs)
    assert "class NbNet(TorchTrainingPlan):" in out
    assert "from torch import nn as tnn" in out
    assert "numpy" not in out
