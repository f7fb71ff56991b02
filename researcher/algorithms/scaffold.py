"""SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning", ICML).

Client drift on non-IID data is corrected with control variates: the server keeps c, each node i keeps c_i
(persisted per experiment on the node), and the node's local steps use g_i(y) - c_i + c instead of g_i(y).
Algorithm 1 of the paper, with option II for the node's new variate:

    node i:  y_i <- x;  K steps  y_i <- y_i - eta_l (g_i(y_i) - c_i + c)
             c_i+ <- c_i - c + (x - y_i) / (K eta_l)
             returns  Delta y_i = y_i - x  (here: y_i itself, blob "params")  and  Delta c_i = c_i+ - c_i
                      (blob "control_delta")
    server:  x <- x + eta_g * mean_{i in S} Delta y_i
             c <- c + (|S| / N) * mean_{i in S} Delta c_i      (N: nodes in the federation)

The server sends c as blob "control" with `ScaffoldConfig`. c holds one entry per floating-point tensor of
the model (same name and shape; zeros at the start); a node returns "control_delta" with the same names
(zeros for buffers it does not train). Two choices differ from the paper's uniform mean, both reducing to it
when the nodes hold equally many samples: the model mean is weighted by sample size, as FedAvg's (so with
eta_g = 1 the model step is exactly FedAvg's), while Delta c keeps the paper's plain mean. N is the length
of the node list `configure_train` was given for the round unless `num_nodes` is set. c is saved in
breakpoints (tensor state). Memory: c (the model's size, its dtype) between rounds, and a second float64 sum
for the control deltas during a round (measured, 10 M float32 parameters, 3 nodes: +260 MiB peak, FedAvg +114 MiB).

SCAFFOLD is not robust to a hostile node: a finite but huge Delta c_i moves c, which every node's next round
uses. The round loop checks each blob finite and of the model's names and shapes; nothing bounds its size.

    from fedsilo.researcher import Experiment, Scaffold
    exp = Experiment(..., aggregator=Scaffold())          # or Scaffold(num_nodes=10, eta_g=1.0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from fedsilo.common.algorithms import ScaffoldConfig

from .base import AggregationError, NodeTask, NodeUpdate, Params, cast_like, check_setting, check_tensors
from .fedavg import FedAverage, WeightedMean

CONTROL = "control"
CONTROL_DELTA = "control_delta"


class Scaffold(FedAverage):
    """SCAFFOLD's server: FedAvg on the models plus the server control variate c, sent to every node.

    Scaffold(num_nodes=None, eta_g=1.0)
    """

    name = "scaffold"
    reply_blobs = frozenset({"params", CONTROL_DELTA})

    def __init__(self, num_nodes: int | None = None, eta_g: float = 1.0) -> None:
        super().__init__()
        check_setting(
            self,
            "num_nodes",
            num_nodes,
            num_nodes is None or (isinstance(num_nodes, int) and num_nodes >= 1),
            "None or an integer >= 1",
        )
        check_setting(self, "eta_g", eta_g, math.isfinite(eta_g) and eta_g > 0, "a positive number")
        self.num_nodes, self.eta_g = num_nodes, float(eta_g)
        self._control: Params = {}
        self._round_nodes: int | None = None  # len(nodes) of the last configure_train
        self._delta: WeightedMean | None = None

    def settings(self) -> dict[str, Any]:
        return {"num_nodes": self.num_nodes, "eta_g": self.eta_g}

    def node_config(self) -> ScaffoldConfig:
        return ScaffoldConfig()

    @property
    def control(self) -> Params:
        """The server control variate c (read-only view: the tensors themselves)."""
        return dict(self._control)

    def configure_train(self, round_index: int, nodes: Sequence[str], global_params: Params) -> dict[str, NodeTask]:
        self._ensure_control(global_params)
        self._round_nodes = len(nodes)
        config = self.node_config()
        blobs = {"params": global_params, CONTROL: self._control}
        return {node: NodeTask(blobs=dict(blobs), config=config) for node in nodes}

    def start_round(self, round_index: int, global_params: Params) -> None:
        self._ensure_control(global_params)
        super().start_round(round_index, global_params)
        self._delta = WeightedMean(self._control, CONTROL_DELTA)

    def _check_extra(self, update: NodeUpdate) -> None:
        delta = update.blobs.get(CONTROL_DELTA)
        if delta is None:
            raise AggregationError(f"node '{update.node_id}': no '{CONTROL_DELTA}' blob (SCAFFOLD needs it)")
        check_tensors(update.node_id, CONTROL_DELTA, delta, self._control)

    def _add_extra(self, update: NodeUpdate) -> None:
        assert self._delta is not None  # made by start_round, which add requires
        self._delta.add(update.node_id, update.blobs[CONTROL_DELTA], 1)  # the paper's plain mean

    def result(self) -> Params:
        contributed = len(self.contributors)
        total = self.num_nodes or self._round_nodes or contributed
        x, mean = self._end_round()
        delta, self._delta = self._delta, None
        assert delta is not None  # made by start_round, which _end_round requires
        if contributed > total:
            raise AggregationError(f"{contributed} nodes contributed but the federation has N = {total} (num_nodes)")
        out: Params = {}
        for k, avg in mean.items():
            if self.eta_g != 1.0:  # x + eta_g (mean - x); eta_g = 1 keeps FedAvg's mean exactly
                x64 = x[k].detach().to(device="cpu", dtype=torch.float64)
                avg = x64 + self.eta_g * avg.sub_(x64)  # out of place: x is the caller's global model
            out[k] = cast_like(avg, x[k])
        # new tensors, not in place: the previous c may still be referenced by the round's tasks or a breakpoint
        for k, d in delta.result().items():
            c = self._control[k]
            self._control[k] = (c.to(torch.float64) + d * (contributed / total)).to(c.dtype)
        return out

    def _ensure_control(self, global_params: Params) -> None:
        """c = 0 for every floating-point tensor on first use; afterwards it must still match the model."""
        floating = {k: v for k, v in global_params.items() if v.is_floating_point()}
        if not self._control:
            self._control = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in floating.items()}
            return
        check_tensors("(server)", CONTROL, self._control, floating)

    def state(self) -> tuple[dict[str, Any], Params]:
        return {}, {f"c.{k}": t for k, t in self._control.items()}

    def load_state(self, meta: dict[str, Any], tensors: Params) -> None:
        self._control = {k[2:]: t.clone() for k, t in tensors.items() if k.startswith("c.")}
