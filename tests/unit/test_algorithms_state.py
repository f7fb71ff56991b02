"""An algorithm's tensor state (FedAdam/FedYogi moments, SCAFFOLD's c) survives state()/load_state() and a
breakpoint on disk bit for bit: the resumed algorithm's next round equals the uninterrupted one's."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from fedsilo.researcher import Experiment
from fedsilo.researcher.algorithms import FedAdam, FedAlgorithm, FedAverage, FedProx, FedYogi, NodeUpdate, Scaffold
from fedsilo.researcher.breakpoints import (
    ALGORITHM_FILE,
    STATE_FILE,
    BreakpointError,
    read_breakpoint,
    save_breakpoint,
)

SOURCE = "class Plan:\n    pass\n"
NODES = ["a", "b", "c"]


def _round(algo: FedAlgorithm, r: int, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + r)  # the same replies for the original and the resumed algorithm
    algo.configure_train(r, [*NODES, "d"], x)
    algo.start_round(r, x)
    for i, node in enumerate(NODES):
        # sorted: a breakpoint gives the tensors back in name order, and the draws must not depend on it
        params = {k: x[k] + _noise(x[k], gen) for k in sorted(x)}
        delta = {
            k: torch.randn(x[k].shape, generator=gen, dtype=x[k].dtype) for k in sorted(x) if x[k].is_floating_point()
        }
        blobs = {"params": params, "control_delta": delta}
        algo.add(NodeUpdate(node, {k: v for k, v in blobs.items() if k in algo.reply_blobs}, 10 * (i + 1)))
    return algo.result()


def _noise(v: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    if not v.is_floating_point():
        return torch.randint(0, 3, v.shape, generator=gen, dtype=v.dtype)
    return 0.1 * torch.randn(v.shape, generator=gen, dtype=v.dtype)


def _start() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {
        "w": torch.randn(4, 3, generator=gen),  # float32
        "d": torch.randn(5, generator=gen, dtype=torch.float64),
        "n": torch.tensor(7),  # an integer buffer: no moment, no control variate
    }


MAKERS = {
    "fedadam": lambda: FedAdam(eta=0.05, beta_1=0.8, beta_2=0.9),
    "fedyogi": lambda: FedYogi(eta=0.05),
    "scaffold": lambda: Scaffold(eta_g=0.9),
}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_state_round_trips_through_a_breakpoint_bit_for_bit(name: str, tmp_path: Path) -> None:
    original = MAKERS[name]()
    x = _start()
    for r in range(2):
        x = _round(original, r, x)
    meta, tensors = original.state()
    assert tensors and any(t.dtype == torch.float64 for t in tensors.values())
    folder = save_breakpoint(tmp_path, 2, {"note": "test"}, x, SOURCE, algorithm_state=(meta, tensors))
    assert (folder / ALGORITHM_FILE).is_file()

    bp = read_breakpoint(tmp_path)
    assert bp.folder == folder and bp.source == SOURCE and _equal(bp.params, x)
    saved_meta, saved = bp.algorithm_state
    assert saved_meta == meta and _equal(saved, tensors)

    resumed = type(original).from_state(original.settings(), saved_meta, saved)
    assert repr(resumed) == repr(original) and _equal(resumed.state()[1], tensors)
    assert _equal(_round(resumed, 2, bp.params), _round(original, 2, x))
    assert _equal(resumed.state()[1], original.state()[1])


def test_a_fresh_algorithm_would_differ_so_the_state_matters() -> None:
    x = _start()
    original = MAKERS["fedadam"]()
    for r in range(2):
        x = _round(original, r, x)
    assert not _equal(_round(MAKERS["fedadam"](), 2, x), _round(original, 2, x))


def test_state_handed_out_is_not_changed_by_later_rounds() -> None:
    for make in MAKERS.values():
        algo = make()
        x = _round(algo, 0, _start())
        _, before = algo.state()
        copy = {k: v.clone() for k, v in before.items()}
        _round(algo, 1, x)
        assert _equal(before, copy), f"{algo!r} changed tensors it had returned from state()"


def test_an_altered_algorithm_state_is_refused(tmp_path: Path) -> None:
    algo = MAKERS["scaffold"]()
    x = _round(algo, 0, _start())
    folder = save_breakpoint(tmp_path, 1, {}, x, SOURCE, algorithm_state=algo.state())
    data = bytearray((folder / ALGORITHM_FILE).read_bytes())
    data[-1] ^= 0x01  # one bit of one control variate
    (folder / ALGORITHM_FILE).write_bytes(bytes(data))
    with pytest.raises(BreakpointError, match=r"algorithm\.safetensors: contents differ"):
        read_breakpoint(folder)
    (folder / ALGORITHM_FILE).unlink()
    with pytest.raises(BreakpointError, match=r"algorithm\.safetensors is missing"):
        read_breakpoint(folder)


def test_a_format_1_breakpoint_reads_with_an_empty_algorithm_state(tmp_path: Path) -> None:
    folder = save_breakpoint(tmp_path, 1, {}, {"w": torch.ones(2)}, SOURCE)
    state = json.loads((folder / STATE_FILE).read_text())
    for key in ("algorithm_state", "algorithm_digest"):
        del state[key]
    state["params_sha256"] = hashlib.sha256((folder / "params.safetensors").read_bytes()).hexdigest()
    state["format_version"] = 1  # formats 1 and 2 record bare sha256s
    (folder / STATE_FILE).write_text(json.dumps(state))
    (folder / ALGORITHM_FILE).unlink()
    assert read_breakpoint(folder).algorithm_state == ({}, {})
    state["format_version"] = 4
    (folder / STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(BreakpointError, match="format 4"):
        read_breakpoint(folder)


def test_fedavg_has_no_state_and_its_breakpoint_holds_an_empty_tensor_file(tmp_path: Path) -> None:
    assert FedAverage().state() == ({}, {})
    folder = save_breakpoint(tmp_path, 0, {}, {"w": torch.ones(2)}, SOURCE, algorithm_state=FedAverage().state())
    assert read_breakpoint(folder).algorithm_state == ({}, {})


@pytest.mark.parametrize("make_algorithm", [lambda: FedAdam(eta=0.1), lambda: FedProx(mu=0.05)], ids=["adam", "prox"])
def test_an_experiment_resumed_from_a_breakpoint_continues_as_if_never_stopped(make_algorithm, tmp_path: Path) -> None:
    from tests.unit.test_experiment_offline import FakeRequests, FakeStore, creds, make, trainer

    store = FakeStore()
    nodes = {"a": trainer(store, "a", 1.0, 10), "b": trainer(store, "b", 3.0, 30)}
    torch.manual_seed(0)  # the plan's model starts from torch's default generator: the same start for both
    straight = make(tmp_path / "straight", nodes, store, aggregator=make_algorithm(), round_limit=3)
    assert straight.run() == 3
    torch.manual_seed(0)
    stopped = make(tmp_path / "stopped", nodes, store, aggregator=make_algorithm(), save_breakpoints=True)
    assert stopped.run(rounds=2) == 2

    # no aggregator passed: it is rebuilt from its class and settings, its tensor state from algorithm.safetensors
    resumed = Experiment.load_breakpoint(tmp_path / "stopped", network=creds())
    assert repr(resumed.aggregator()) == repr(make_algorithm())
    resumed._requests = FakeRequests(nodes)  # type: ignore[assignment]
    resumed._filestore = store  # type: ignore[assignment]
    assert resumed.run() == 1
    assert _equal(resumed.training_plan().get_parameters(), straight.training_plan().get_parameters())
