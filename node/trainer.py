"""The node's training loop: the plan supplies `training_step`, the model, optimizer and data; the node runs it.

The loop lives here, not in the plan, so that an approved plan cannot escape what this node enforces:
epochs and update caps, a wall-clock budget per round, differential privacy at least as strong as `[dp]`
(Opacus; epsilon from the node's own accountant), the algorithm's node-side hooks (FedProx, SCAFFOLD), a
per-batch error policy, the NaN/inf checks, and the sample count (the node counts what it iterated).

    trainer = Trainer(plan, args, cfg.limits, cfg.dp, algorithm=config, hooks=make_hooks(config, state_dir))
    result = trainer.train(train_loader, received_params, extra_blobs)   # -> TrainResult
    metrics = trainer.test(test_loader)
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from fedsilo.common.algorithms import AlgorithmConfig, FedAvgConfig
from fedsilo.common.errors import FedsiloError, NonFiniteError
from fedsilo.common.plan_source import CUSTOM_LOOP_WARNING, node_owned_overrides
from fedsilo.common.serialization import non_finite
from fedsilo.common.training_args import TrainingArgs
from fedsilo.common.training_plan import TorchTrainingPlan, TrainingPlanError, batch_len, seed_everything

from .algorithms import NodeHooks, Params
from .algorithms.base import trainable
from .config import DPPolicy, Limits, NodeSection
from .dp_policy import step_cap
from .metric_bounds import MetricsAccumulator
from .privacy import WeightGuard, drop_activations, effective_dp, make_private, round_epsilon, unwrap

log = logging.getLogger("fedsilo.node.trainer")

ScalarCallback = Callable[[str, float, int, int, int, int], None]
"""on_scalar(key, value, step, epoch, num_samples, total_samples)."""

NOT_ENFORCED = "not enforced: the plan runs its own loop (epochs, num_updates, max_train_seconds, max_bad_batches)"


class CustomLoopRefused(FedsiloError):
    """The plan defines a method the node's trainer owns, and this node does not allow that plan to."""


@dataclass
class TrainResult:
    """What a round's training produced. `params` is a copy taken right after training: what is uploaded,
    whatever plan code runs afterwards (testing_step)."""

    metrics: dict[str, float]
    sample_count: int
    steps: int
    epsilon: float | None
    extra_blobs: dict[str, Params]
    params: Params
    applied_caps: dict[str, Any] = field(default_factory=dict)


def check_plan_loop(plan_cls: type, plan_sha256: str, node: NodeSection, dp: DPPolicy) -> list[str]:
    """The node-owned methods the plan overrides ([] for a plan the trainer runs); `CustomLoopRefused` unless
    `[node] allow_custom_loop` lists the plan's sha256, and always under `[dp] required`."""
    overrides = node_owned_overrides(plan_cls)
    if not overrides:
        return []
    what = f"plan {plan_sha256[:12]} defines {', '.join(overrides)}: it {CUSTOM_LOOP_WARNING}"
    if dp.required:
        raise CustomLoopRefused(f"{what}; this node requires differential privacy, so it runs only its own loop")
    if plan_sha256 not in node.allow_custom_loop:
        raise CustomLoopRefused(f"{what}; refused (a node may allow it with [node] allow_custom_loop)")
    return overrides


@dataclass
class _Progress:
    """Counters of one training loop."""

    step: int = 0
    epoch: int = 0
    skipped: int = 0
    seen_total: int = 0
    max_epoch_seen: int = 0
    train_s: float = 0.0
    logged_step: int = 0
    loss_sum: torch.Tensor | float = 0.0  # stays on the device: no sync per step
    last_loss: float | None = None
    stopped_by: str | None = None


class Trainer:
    """Runs a plan's `training_step` under the node's rules (see the module docstring).

    `custom_loop`: the overrides `check_plan_loop` allowed; the trainer then calls the plan's own
    `training_routine`, and says in `applied_caps["custom_loop"]` that the node's caps were not enforced.
    """

    def __init__(
        self,
        plan: TorchTrainingPlan,
        training_args: TrainingArgs,
        limits: Limits,
        dp_policy: DPPolicy,
        algorithm: AlgorithmConfig | None = None,
        hooks: NodeHooks | None = None,
        on_scalar: ScalarCallback | None = None,
        custom_loop: list[str] | None = None,
    ) -> None:
        self.plan = plan
        self.args = training_args
        self.limits = limits
        self.dp_policy = dp_policy
        self.algorithm = algorithm or FedAvgConfig()
        self.hooks = hooks or NodeHooks(self.algorithm)
        self.on_scalar = on_scalar
        self.custom_loop = list(custom_loop or [])
        self.applied_caps: dict[str, Any] = {}
        self.test_warnings: list[str] = []

    # ------------------------------------------------------------------------------------------ training
    def train(self, loader: DataLoader, received: Params, extra_blobs: dict[str, Params] | None = None) -> TrainResult:
        """One round of local training from the received global parameters (already loaded in the plan)."""
        if self.args.random_seed is not None:
            seed_everything(self.args.random_seed)
        if self.custom_loop:
            return self._train_custom(loader)
        plan = self.plan
        plain = TorchTrainingPlan.model(plan)
        optimizer = TorchTrainingPlan.optimizer(plan)
        self.hooks.before_training(plain, received, extra_blobs or {})
        dp = effective_dp(self.args.dp_args, self.dp_policy)
        total = len(loader.dataset)  # type: ignore[arg-type]
        model, engine, guard = plain, None, None
        if dp is not None:
            model, optimizer, loader, engine = make_private(plain, optimizer, loader, dp)
            plan._model, plan._optimizer = model, optimizer  # training_step's self.model() is the private one
            guard = WeightGuard(trainable(plain))
        try:
            progress = self._loop(model, plain, optimizer, loader, guard, total)
        finally:
            if engine is not None:
                plan._model = unwrap(model)
                plan._optimizer = optimizer.original_optimizer  # type: ignore[attr-defined]
        base_optimizer = getattr(optimizer, "original_optimizer", optimizer)
        lr = float(base_optimizer.param_groups[0].get("lr", 0.0))
        extra = self.hooks.after_training(plain, progress.step, lr)
        params = TorchTrainingPlan.get_parameters(plan)  # a snapshot: a testing_step after this changes nothing sent
        bad = non_finite(params)
        if bad:
            raise NonFiniteError(f"parameters {', '.join(bad[:5])} hold NaN or infinity after step "
                                 f"{progress.step} of node '{plan.node_id}'")  # fmt: skip
        epsilon = round_epsilon(engine, dp) if engine is not None and dp is not None else None
        metrics = {
            "loss": float(progress.loss_sum) / max(progress.seen_total, 1),  # the round's mean, not one batch
            "last_loss": float(progress.last_loss or 0.0),
            "train_s": progress.train_s,
            "steps": float(progress.step),
            "epochs": float(progress.epoch),
            "samples_seen": float(progress.seen_total),
            "skipped_batches": float(progress.skipped),
        }
        if epsilon is not None:
            metrics["epsilon"] = epsilon
        # The FedAvg weight: the samples of the training split the node drew in one epoch (all of them after a
        # full epoch), bounded by the split's size: never a number the plan reports.
        sample_count = min(progress.max_epoch_seen, total)
        return TrainResult(metrics, sample_count, progress.step, epsilon, extra, params, dict(self.applied_caps))

    def _limits(self) -> tuple[int | None, int]:
        """(maximum steps or None, epochs), the node's caps applied and recorded."""
        ta, lim = self.args, self.limits
        epochs = ta.epochs
        if lim.max_epochs is not None and epochs > lim.max_epochs:
            self.applied_caps["epochs"] = {"requested": epochs, "applied": lim.max_epochs}
            epochs = lim.max_epochs
        return step_cap(ta, lim), epochs

    def _loop(
        self,
        model: nn.Module,
        plain: nn.Module,
        optimizer: torch.optim.Optimizer,
        loader: DataLoader,
        guard: WeightGuard | None,
        total: int,
    ) -> _Progress:
        ta, lim = self.args, self.limits
        max_steps, epochs = self._limits()
        params = trainable(plain)
        device = self.plan._device
        p = _Progress()
        started = time.monotonic()
        model.train()
        done = False
        while not done:
            p.epoch += 1
            seen, batches, steps_before = 0, 0, p.step
            for index, batch in self._batches(loader, p):
                batches += 1
                data, target = _to_device(batch[0], device), _to_device(batch[1], device)
                n = batch_len(target)
                if n == 0:  # Poisson sampling under DP can draw an empty batch
                    continue
                t0 = time.perf_counter()
                loss = self._step(model, plain, optimizer, params, guard, data, target, p, index)
                if loss is None:
                    continue
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                p.train_s += time.perf_counter() - t0
                p.step += 1
                seen += n
                p.seen_total += n
                p.last_loss = float(loss)
                p.loss_sum = p.loss_sum + loss * n
                # Every `log_interval` steps, as Fed-BioMed logs its batches, and the round's last step (below) when
                # it is not one of them. A first step logged as well doubled the scalar messages of a short round
                # (peerbench: 10 steps, log_interval 10), each one worker -> daemon -> broker -> researcher, and
                # cost 8-10 % of the round at K=10 small (bench/scaling.py A/B with none, 2026-12-01).
                if self.on_scalar is not None and p.step % ta.log_interval == 0:
                    self.on_scalar("loss", p.last_loss, p.step, p.epoch, seen, total)
                    p.logged_step = p.step
                if max_steps is not None and p.step >= max_steps:
                    if ta.num_updates is None or p.step < ta.num_updates:
                        self._record_steps_cap(max_steps)
                    done = True
                    break
                if lim.max_train_seconds is not None and time.monotonic() - started >= lim.max_train_seconds:
                    p.stopped_by = "max_train_seconds"
                    self.applied_caps["max_train_seconds"] = {
                        "requested": None, "applied": lim.max_train_seconds, "stopped_after_step": p.step}  # fmt: skip
                    done = True
                    break
            p.max_epoch_seen = max(p.max_epoch_seen, seen)
            if batches == 0 and p.skipped == 0:
                raise TrainingPlanError("the data loader produced no batches")
            if p.step == steps_before:
                break  # an epoch without a step would repeat forever (every batch empty or skipped)
            if max_steps is None and p.epoch >= epochs:
                done = True
        if p.last_loss is None:
            raise TrainingPlanError("no training step ran (every batch was empty or skipped)")
        if self.on_scalar is not None and p.logged_step != p.step:
            self.on_scalar("loss", p.last_loss, p.step, p.epoch, seen, total)
        return p

    def _record_steps_cap(self, max_steps: int) -> None:
        if self.args.dry_run:
            return
        self.applied_caps.setdefault("num_updates", {"requested": self.args.num_updates, "applied": max_steps})

    def _batches(self, loader: DataLoader, p: _Progress) -> Iterator[tuple[int, Any]]:
        """The loader's batches; one that fails to load (the plan's dataset raised) is a bad batch."""
        it = iter(loader)
        index = 0
        while True:
            index += 1
            try:
                batch = next(it)
            except StopIteration:
                return
            except Exception as exc:
                self._bad_batch(exc, p, index, "loading")
                continue
            yield index, batch

    def _step(
        self,
        model: nn.Module,
        plain: nn.Module,
        optimizer: torch.optim.Optimizer,
        params: dict[str, nn.Parameter],
        guard: WeightGuard | None,
        data: Any,
        target: Any,
        p: _Progress,
        index: int,
    ) -> torch.Tensor | None:
        """One optimiser step; the loss (detached), or None when the batch was skipped."""
        optimizer.zero_grad(set_to_none=True)
        try:
            loss = self.plan.training_step(data, target)
            if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
                raise TrainingPlanError("training_step must return a scalar loss tensor")
            # Checked before the step changes the model. One host read per step: about 3 us on CPU.
            value = float(loss.detach())
            if not math.isfinite(value):
                raise NonFiniteError(
                    f"the loss is {value} at step {p.step + 1} (epoch {p.epoch}, batch {index}) on "
                    f"node '{self.plan.node_id}'; training stopped before that step"
                )
            loss.backward()
        except (NonFiniteError, TrainingPlanError):
            raise
        except Exception as exc:
            drop_activations(model)
            self._bad_batch(exc, p, index, "training_step")
            return None
        extra = self._term_gradients(plain, params)
        if guard is not None:
            guard.check("between two steps")
            if optimizer.pre_step():  # type: ignore[attr-defined]  # Opacus: clip and noise into .grad
                self._correct(plain, params, extra)
                optimizer.original_optimizer.step()  # type: ignore[attr-defined]
            guard.snapshot()
        else:
            self._correct(plain, params, extra)
            optimizer.step()
        return loss.detach()

    def _term_gradients(
        self, plain: nn.Module, params: dict[str, nn.Parameter]
    ) -> list[torch.Tensor | None] | None:
        """Gradient of the algorithm's loss term, kept apart so that DP's clipping never sees it."""
        term = self.hooks.loss_term(plain)
        if term is None:
            return None
        if not math.isfinite(float(term.detach())):
            raise NonFiniteError(f"the {self.algorithm.name} loss term is not finite on node '{self.plan.node_id}'")
        return list(torch.autograd.grad(term, list(params.values()), allow_unused=True))

    def _correct(
        self, plain: nn.Module, params: dict[str, nn.Parameter], extra: list[torch.Tensor | None] | None
    ) -> None:
        if extra is not None:
            for param, grad in zip(params.values(), extra, strict=True):
                if grad is None:
                    continue
                if param.grad is None:
                    param.grad = grad.detach().clone()
                else:
                    param.grad.add_(grad)
        self.hooks.after_backward(plain)

    def _bad_batch(self, exc: Exception, p: _Progress, index: int, where: str) -> None:
        p.skipped += 1
        limit = self.limits.max_bad_batches
        if limit == 0:
            raise exc  # the policy's default: the first failure fails the round, as it always did
        text = f"batch {index} of epoch {p.epoch} failed in {where}: {type(exc).__name__}: {exc}"
        if p.skipped > limit:
            raise TrainingPlanError(f"{text}; {p.skipped} batches failed, more than [limits] max_bad_batches = "
                                    f"{limit}") from exc  # fmt: skip
        log.warning("skipped %s (%d of at most %d)", text, p.skipped, limit)

    def _train_custom(self, loader: DataLoader) -> TrainResult:
        """An allowed plan's own `training_routine`: the node checks only what it returns."""
        if self.algorithm.name != "fedavg":
            raise TrainingPlanError(f"a plan that runs its own loop cannot run algorithm '{self.algorithm.name}'")
        if self.args.dp_args:
            raise TrainingPlanError("dp_args asked, but the plan runs its own loop: the node cannot apply DP to it")
        routine = getattr(self.plan, "training_routine", None)
        raw = routine(loader, on_scalar=self.on_scalar) if callable(routine) else {}
        metrics = {k: float(v) for k, v in (raw or {}).items() if isinstance(v, int | float) and v is not True}
        params = TorchTrainingPlan.get_parameters(self.plan)
        bad = non_finite(params)
        if bad:
            raise NonFiniteError(f"parameters {', '.join(bad[:5])} hold NaN or infinity after the plan's own loop")
        self.applied_caps["custom_loop"] = {"requested": ", ".join(self.custom_loop), "applied": NOT_ENFORCED}
        steps = int(metrics.get("steps", 0))
        return TrainResult(metrics, len(loader.dataset), steps, None, {}, params, dict(self.applied_caps))  # type: ignore[arg-type]

    # ------------------------------------------------------------------------------------------- testing
    def test(self, loader: DataLoader) -> dict[str, float]:
        """The plan's `testing_step` metrics over a loader: numbers as sample-weighted means, `Metric`s
        (`common/metrics.py`) merged over the batches and computed once; bounded by `node/metric_bounds.py`,
        whose reasons for what it left out are in `test_warnings` afterwards."""
        acc = MetricsAccumulator.for_limits(self.limits)
        if "testing_routine" in self.custom_loop:
            acc.add(self.plan.testing_routine(loader), 1)  # type: ignore[attr-defined]
            return self._tested(acc)
        model = TorchTrainingPlan.model(self.plan)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for data, target in loader:
                data, target = _to_device(data, self.plan._device), _to_device(target, self.plan._device)
                acc.add(self.plan.testing_step(data, target), batch_len(target))
        model.train(was_training)
        return self._tested(acc)

    def _tested(self, acc: MetricsAccumulator) -> dict[str, float]:
        metrics = acc.result()
        self.test_warnings = acc.warnings()
        return metrics

    def commit(self) -> None:
        """The update reached the file store: let the algorithm persist its state (SCAFFOLD's c_i)."""
        self.hooks.commit()


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, list | tuple):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value
