"""The training-plan API researchers subclass. The loop that runs it is the node's (`fedsilo.node.trainer`):
the plan supplies the model, optimizer, data and `training_step`, never the loop, so that it cannot
escape the node's caps and DP."""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .batched_rows import collate_rows, rows_view
from .errors import FedsiloError
from .training_args import DEFAULT_BATCH_SIZE, TrainingArgs, TrainingArgsError


class TrainingPlanError(FedsiloError):
    """A training plan broke its contract (wrong return type, missing hook, incompatible with DP)."""


class DataManager:
    """Wraps a torch Dataset plus DataLoader arguments; the round's arguments are merged in by
    `apply_training_args` under the rule written in `TrainingArgs`.

        DataManager(CsvDataset(self.dataset_path), batch_size=batch_size, shuffle=True)
    """

    def __init__(self, dataset: Dataset, **loader_args: Any) -> None:
        if not isinstance(dataset, Dataset):
            raise TrainingPlanError(f"DataManager needs a torch Dataset, got {type(dataset).__name__}")
        self.dataset = dataset
        self.loader_args = dict(loader_args)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def apply_training_args(self, ta: TrainingArgs, max_batch_size: int | None = None) -> dict[str, Any]:
        """Merge the researcher's loader request into this DataManager's own arguments, then cap.

        A key both set to different values is refused (TrainingArgsError naming both); keys only one
        side sets are kept; no batch size anywhere means `DEFAULT_BATCH_SIZE`. Returns the node's
        changes as `applied_caps` entries ({"batch_size": {"requested", "applied"}}), empty when none.
        """
        for key, asked in ta.loader_request().items():
            own = self.loader_args.get(key, asked)
            if own != asked:
                where = "batch_size" if key == "batch_size" else f"loader_args.{key}"
                raise TrainingArgsError(
                    f"training_args '{where}' asks {key}={asked!r} but the plan's DataManager(..., {key}={own!r}) "
                    f"sets another value; set {key} in one place (training_data(batch_size) receives "
                    "training_args' batch_size)"
                )
            self.loader_args[key] = asked
        self.loader_args.setdefault("batch_size", DEFAULT_BATCH_SIZE)
        requested = self.loader_args["batch_size"]
        if max_batch_size is not None and requested > max_batch_size:
            self.loader_args["batch_size"] = max_batch_size
            return {"batch_size": {"requested": requested, "applied": max_batch_size}}
        return {}

    def loader(self, dataset: Dataset | None = None, **overrides: Any) -> DataLoader:
        """A DataLoader over `dataset` (default: this one's) with the loader arguments and `overrides`. Without a
        `collate_fn` of the plan's, a dataset of tensor rows is fetched a batch at a time (`batched_rows`): the
        same batches, without a `__getitem__` per sample."""
        args = {**self.loader_args, **overrides}
        data = dataset if dataset is not None else self.dataset
        batching = args.get("batch_size", 1) is not None or args.get("batch_sampler") is not None
        if batching and args.get("collate_fn") is None:
            data, args["collate_fn"] = rows_view(data), collate_rows
        return DataLoader(data, **args)

    def split(self, test_ratio: float, seed: int = 0) -> tuple[DataLoader, DataLoader | None]:
        """Train and test loaders; the test subset is fixed for a given seed so rounds stay comparable."""
        n = len(self)
        n_test = round(n * test_ratio) if test_ratio > 0 else 0
        if n_test == 0:
            return self.loader(), None
        if n_test >= n:
            raise TrainingPlanError(f"test_ratio {test_ratio} leaves no training samples out of {n}")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        train = Subset(self.dataset, perm[n_test:])
        test = Subset(self.dataset, perm[:n_test])
        return self.loader(train), self.loader(test, shuffle=False, drop_last=False)


def _call_hook(hook: Callable, *args: Any) -> Any:
    """Call a user hook that may take its argument or not (Fed-BioMed plans use both styles)."""
    try:
        n_params = len(inspect.signature(hook).parameters)
    except (TypeError, ValueError):
        n_params = len(args)
    return hook(*args[:n_params])


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators (every device's where an accelerator is present)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        torch.manual_seed(seed)
    else:
        # The CPU generator is all there is to seed. `torch.manual_seed` also queues a seed for CUDA's lazy
        # initialisation, formatting the caller's stack each time even in a CPU-only build: 0.17 ms at the top
        # of a stack, 0.43 ms forty frames down (2-core VM, 2026-12-01), in every round of a node.
        torch.default_generator.manual_seed(seed)


class TorchTrainingPlan:
    """Subclass it: `init_model`, `training_data` and `training_step` are required.

    The node's trainer runs the loop (epochs, caps, DP, algorithm hooks); a plan that defines one of
    `fedsilo.common.plan_source.NODE_OWNED_METHODS` (e.g. an old-style `training_routine`) is refused by
    nodes unless their data manager allows it.

    The framework sets `model_args`, `training_args` (TrainingArgs), `dataset_path`, `dataset`
    (metadata dict), `round` and `node_id` before calling `post_init`.

        class HeartPlan(TorchTrainingPlan):
            def init_model(self, model_args):
                return nn.Linear(model_args["in_features"], 2)
            def training_data(self, batch_size):
                return DataManager(CsvDataset(self.dataset_path), batch_size=batch_size, shuffle=True)
            def training_step(self, data, target):
                return nn.functional.cross_entropy(self.model()(data), target)
    """

    local_parameters: tuple[str, ...] = ()
    """Personalised layers (FedPer; Fed-BioMed's local layers): parameter names, or prefixes ending in ".",
    that never leave a node. Each node keeps its own between the rounds of one experiment; the researcher's
    global model holds the other parameters only. E.g. `local_parameters = ("head.",)`."""

    def __init__(self) -> None:
        self.model_args: dict[str, Any] = {}
        self.training_args: TrainingArgs = TrainingArgs()
        self.dataset_path: str | None = None
        self.dataset: dict[str, Any] = {}
        self.round: int = 0
        self.node_id: str = ""
        self._model: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._device = torch.device("cpu")

    # ------------------------------------------------------------------ user hooks
    def init_model(self, model_args: dict[str, Any]) -> nn.Module:
        raise TrainingPlanError(f"{type(self).__name__} must define init_model(self, model_args)")

    def init_optimizer(self, optimizer_args: dict[str, Any]) -> torch.optim.Optimizer:
        """Default: SGD with the given arguments (`lr` at least)."""
        args = dict(optimizer_args) or {"lr": 0.01}
        return torch.optim.SGD(self.model().parameters(), **args)

    def init_dependencies(self) -> list[str]:
        """Extra import lines shipped with the plan's source."""
        return []

    def training_data(self, batch_size: int) -> DataManager:
        raise TrainingPlanError(f"{type(self).__name__} must define training_data(self, batch_size)")

    def training_step(self, data: Any, target: Any) -> torch.Tensor:
        raise TrainingPlanError(f"{type(self).__name__} must define training_step(self, data, target)")

    def testing_step(self, data: Any, target: Any) -> dict[str, float] | None:
        """Default: the training loss and, for class scores, accuracy."""
        loss = float(self.training_step(data, target))
        metrics = {"loss": loss}
        if isinstance(data, torch.Tensor) and isinstance(target, torch.Tensor) and not target.is_floating_point():
            out = self.model()(data)
            if isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[1] > 1:
                metrics["accuracy"] = float((out.argmax(dim=1) == target).float().mean())
        return metrics

    # ------------------------------------------------------------------ framework side
    def post_init(self, model_args: dict[str, Any], training_args: TrainingArgs | dict[str, Any]) -> None:
        """Build the model from the round's arguments; the optimizer is built at its first use.

        Why lazily: the researcher builds the plan only to hold the global model and never steps, and
        torch's first optimizer pulls in torch._dynamo (1.2-1.6 s of `Experiment(...)` on the 2-core dev machine).
        """
        self.model_args = dict(model_args)
        self.training_args = TrainingArgs.parse(training_args)
        use_cuda = self.training_args.use_gpu and torch.cuda.is_available()
        self._device = torch.device("cuda" if use_cuda else "cpu")
        model = _call_hook(self.init_model, self.model_args)
        if not isinstance(model, nn.Module):
            raise TrainingPlanError(f"init_model must return a torch.nn.Module, got {type(model).__name__}")
        self._model = model.to(self._device)
        self._optimizer = None

    def model(self) -> nn.Module:
        if self._model is None:
            raise TrainingPlanError("the model is not built yet: post_init has not run")
        return self._model

    def optimizer(self) -> torch.optim.Optimizer:
        """The round's optimizer, built by `init_optimizer` on first use (after `post_init`)."""
        if self._optimizer is None:
            if self._model is None:
                raise TrainingPlanError("the optimizer is not built yet: post_init has not run")
            optimizer = _call_hook(self.init_optimizer, dict(self.training_args.optimizer_args))
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise TrainingPlanError(
                    f"init_optimizer must return a torch.optim.Optimizer, got {type(optimizer).__name__}"
                )
            self._optimizer = optimizer
        return self._optimizer

    def _plain_model(self) -> nn.Module:
        model = self.model()
        # Opacus wraps the model during DP training; parameters travel under the plain names.
        return getattr(model, "_module", model)

    def get_parameters(self, copy: bool = True) -> dict[str, torch.Tensor]:
        """The model's state dict on the CPU, a snapshot; `copy=False` gives the live tensors themselves (a CPU
        model's parameters) to a caller that only reads them at once: the node's check that the received model
        fits the plan's (a 40 MB clone less a round for 10 M parameters)."""
        tensors = {k: v.detach().cpu() for k, v in self._plain_model().state_dict().items()}
        return {k: v.clone() for k, v in tensors.items()} if copy else tensors

    def set_parameters(self, params: dict[str, torch.Tensor]) -> None:
        """Load `params`: every parameter, or every shared one (the local ones are then left as they are)."""
        model = self._plain_model()
        if set(params) == set(model.state_dict()):
            model.load_state_dict(params, strict=True)
            return
        shared = set(self.shared_parameters())
        if set(params) != shared:
            missing, extra = sorted(shared - set(params))[:5], sorted(set(params) - shared)[:5]
            raise TrainingPlanError(f"parameters do not fit the model: missing {missing}, unexpected {extra}")
        model.load_state_dict(params, strict=False)

    def is_local(self, name: str) -> bool:
        """Whether parameter `name` stays on the node (see `local_parameters`)."""
        return any(name == p or (p.endswith(".") and name.startswith(p)) for p in self.local_parameters)

    def shared_parameters(self, copy: bool = True) -> dict[str, torch.Tensor]:
        """What travels: every parameter that is not local (`copy` as in `get_parameters`)."""
        return {k: v for k, v in self.get_parameters(copy).items() if not self.is_local(k)}

    def local_state(self, copy: bool = True) -> dict[str, torch.Tensor]:
        """What stays on the node: the local parameters (`copy` as in `get_parameters`)."""
        return {k: v for k, v in self.get_parameters(copy).items() if self.is_local(k)}

    def data_manager(self) -> DataManager:
        """Call `training_data` with the round's batch size and check what it returns."""
        dm = _call_hook(self.training_data, self.training_args.batch_size or DEFAULT_BATCH_SIZE)
        if not isinstance(dm, DataManager):
            raise TrainingPlanError(f"training_data must return a DataManager, got {type(dm).__name__}")
        return dm


def batch_len(target: Any) -> int:
    """Samples in a batch, from its target (a tensor's first dimension, a dictionary's first value, else len(),
    else 1). A dictionary is MONAI's form of a batch (`MedicalFolderDataset`): its len() counts keys."""
    if isinstance(target, torch.Tensor):
        return int(target.shape[0]) if target.ndim > 0 else 1
    if isinstance(target, dict) and target:
        return batch_len(next(iter(target.values())))
    try:
        return len(target)
    except TypeError:
        return 1
