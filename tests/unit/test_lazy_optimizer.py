"""`Experiment(...)` builds the plan locally to hold the global model; it must not build an optimizer.

The researcher never steps, and torch's first optimizer imports torch._dynamo (1.2-1.6 s of the
construction on the 2-core dev machine), so the check runs in a fresh interpreter where nothing
imported it before.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import REPO

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from torch import nn
    from fedsilo.common.training_plan import DataManager, TorchTrainingPlan
    from fedsilo.network.credentials import Credentials, FileStoreSettings, MqttSettings
    from fedsilo.network.messages import DatasetInfo
    from fedsilo.researcher import Experiment

    class TinyPlan(TorchTrainingPlan):
        def init_model(self, model_args):
            return nn.Linear(model_args["n"], 1)

        def init_optimizer(self, optimizer_args):
            return torch.optim.Adam(self.model().parameters(), lr=optimizer_args["lr"])

        def training_data(self, batch_size):
            return DataManager(torch.utils.data.TensorDataset(torch.zeros(4, 2), torch.zeros(4)))

        def training_step(self, data, target):
            return ((self.model()(data).squeeze(1) - target) ** 2).mean()

    creds = Credentials(party="researcher", role="researcher", mqtt=MqttSettings(username="researcher", password="x"),
                        filestore=FileStoreSettings(url="http://127.0.0.1:9", token="t"))
    data = {"n1": DatasetInfo(dataset_id="ds", name="d", tags=["t"], data_type="csv", shape=[100, 2])}
    exp = Experiment(tags=["t"], training_plan_class=TinyPlan, model_args={"n": 2}, training_data=data,
                     training_args={"optimizer_args": {"lr": 0.1}}, round_limit=1, network=creds,
                     experimentation_folder=sys.argv[1])
    plan = exp.training_plan()
    print("optimizer built:", plan._optimizer is not None)
    print("torch._dynamo imported:", "torch._dynamo" in sys.modules)
    print("model ready:", sum(p.numel() for p in plan.model().parameters()))
    """
)


def test_experiment_construction_builds_no_optimizer(tmp_path: Path) -> None:
    script = tmp_path / "build.py"  # a file: plan_source needs the class's source
    script.write_text(SCRIPT)
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "experiments")],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "optimizer built: False" in out.stdout
    assert "torch._dynamo imported: False" in out.stdout
    assert "model ready: 3" in out.stdout
