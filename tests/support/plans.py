"""Training-plan sources that tests send as a researcher would (text, as it crosses the network)."""

LOGREG_PLAN = '''
import torch
from torch import nn
from fedsilo.common.datasets import CsvDataset
from fedsilo.common.training_plan import DataManager, TorchTrainingPlan


class HeartPlan(TorchTrainingPlan):
    """Logistic regression on the heart CSV."""

    def init_model(self, model_args):
        return nn.Linear(4, 2)

    def training_data(self, batch_size):
        return DataManager(CsvDataset(self.dataset_path), batch_size=batch_size, shuffle=True)

    def training_step(self, data, target):
        return nn.functional.cross_entropy(self.model()(data), target)
'''

# The same plan name with one changed line: the GUI shows it as a new plan with a diff.
LOGREG_PLAN_V2 = LOGREG_PLAN.replace(
    "return nn.Linear(4, 2)", "return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))"
)
