"""Each round's global model: only the latest in memory, earlier rounds read back from disk; absolute paths.

Same in-process broker and file store fakes as test_experiment_offline.py; the experiment, its
aggregator and the round archive are the real ones."""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import weakref
from collections import deque
from pathlib import Path

import blake3
import pytest
import torch

from fedsilo.common.serialization import params_to_bytes
from fedsilo.researcher import Experiment, FedAverage
from fedsilo.researcher.breakpoints import BreakpointError
from fedsilo.researcher.rounds import RoundArchiveError
from tests.unit.test_experiment_offline import FakeRequests, FakeStore, creds, make, trainer

Params = dict[str, torch.Tensor]


class RecordingFedAverage(FedAverage):
    """FedAverage that keeps a copy of every result, so the test knows what was aggregated."""

    def __init__(self) -> None:
        super().__init__()
        self.results: list[Params] = []

    def result(self) -> Params:
        out = super().result()
        self.results.append({k: v.clone() for k, v in out.items()})
        return out


def _nodes(store: FakeStore) -> dict:
    return {"a": trainer(store, "a", 1.0, 10), "b": trainer(store, "b", 3.0, 30)}


def _tensors(root: object) -> dict[int, int]:
    """data_ptr -> nbytes of every tensor reachable from `root` through fedsilo and torch objects."""
    found: dict[int, int] = {}
    seen: set[int] = set()
    todo: list[object] = [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
        elif isinstance(obj, dict):
            todo.extend(obj.keys())
            todo.extend(obj.values())
        elif isinstance(obj, list | tuple | set | frozenset | deque):
            todo.extend(obj)
        elif type(obj).__module__.startswith(("fedsilo", "torch", "tests")) and hasattr(obj, "__dict__"):
            todo.extend(vars(obj).values())
    return found


def test_each_round_reads_back_equal_to_what_was_aggregated(tmp_path: Path) -> None:
    store = FakeStore()
    agg = RecordingFedAverage()
    exp = make(tmp_path, _nodes(store), store, aggregator=agg, round_limit=4)
    initial = exp.training_plan().get_parameters()
    assert exp.run() == 4
    exp.close()  # the last round's file is written while the next round would run: close() waits for it
    folder = exp.experimentation_path() / "rounds"
    assert sorted(p.name for p in folder.iterdir()) == [f"round_{r:04d}.safetensors" for r in range(4)]

    params = exp.aggregated_params()
    assert list(params) == [0, 1, 2, 3] and len(params) == 4 and 3 in params and 4 not in params
    with pytest.raises(KeyError):
        params[4]
    for r, got in params.items():  # rounds 0-2 from disk, round 3 from memory
        assert got.keys() == {"params"}
        assert got["params"].keys() == agg.results[r].keys()
        for k, v in agg.results[r].items():
            assert torch.equal(got["params"][k], v), (r, k)
            assert torch.allclose(v, initial[k] + 2.5 * (r + 1))  # (1*10 + 3*30) / 40 a round
    assert not any(torch.equal(params[0]["params"][k], v) for k, v in params[3]["params"].items())


def test_earlier_rounds_are_not_held_in_memory(tmp_path: Path) -> None:
    store = FakeStore()
    exp = make(tmp_path, _nodes(store), store, round_limit=5)
    exp.run_once()
    round0 = [weakref.ref(t) for t in exp.aggregated_params()[0]["params"].values()]
    exp.run_once()
    held_after_2 = _tensors(exp)
    exp.run(rounds=3)
    gc.collect()
    assert all(ref() is None for ref in round0), "round 0's tensors are still referenced"
    assert _tensors(exp.aggregator()) == {}, "the aggregator keeps tensors between rounds"
    held = _tensors(exp)
    model_bytes = sum(t.untyped_storage().nbytes() for t in exp.aggregated_params()[4]["params"].values())
    assert sum(held.values()) == sum(held_after_2.values())  # the same after 2 and 5 rounds
    assert sum(held.values()) <= 2 * model_bytes  # the global parameters and the local plan's model


def test_resumed_experiment_reads_the_rounds_saved_before(tmp_path: Path) -> None:
    store = FakeStore()
    exp = make(tmp_path, _nodes(store), store, save_breakpoints=True, round_limit=4)
    assert exp.run() == 4
    before = {r: v["params"] for r, v in exp.aggregated_params().items()}

    resumed = Experiment.load_breakpoint(tmp_path, network=creds())
    assert list(resumed.aggregated_params()) == [0, 1, 2, 3]
    for r, params in before.items():
        assert all(torch.equal(resumed.aggregated_params()[r]["params"][k], v) for k, v in params.items())

    # from an earlier breakpoint: the later rounds' files are not rounds of this experiment (yet)
    early = Experiment.load_breakpoint(exp.experimentation_path() / "breakpoint_0002", network=creds())
    assert list(early.aggregated_params()) == [0, 1]
    early._requests = FakeRequests(_nodes(store))  # type: ignore[assignment]
    early._filestore = store  # type: ignore[assignment]
    assert early.run() == 2 and list(early.aggregated_params()) == [0, 1, 2, 3]
    assert torch.equal(early.aggregated_params()[2]["params"]["bias"], before[2]["bias"])


def test_an_altered_round_file_is_refused(tmp_path: Path) -> None:
    store = FakeStore()
    exp = make(tmp_path, _nodes(store), store, save_breakpoints=True, round_limit=3)
    exp.run()
    path = exp.experimentation_path() / "rounds" / "round_0000.safetensors"
    forged = exp.aggregated_params()[2]["params"]
    path.write_bytes(params_to_bytes(forged))
    with pytest.raises(RoundArchiveError, match="blake3"):
        exp.aggregated_params()[0]
    resumed = Experiment.load_breakpoint(tmp_path, network=creds())
    with pytest.raises(RoundArchiveError, match="blake3"):
        resumed.aggregated_params()[0]
    path.write_bytes(b"\x80\x04junk")
    with pytest.raises(RoundArchiveError):
        resumed.aggregated_params()[0]


def test_round_digests_are_blake3_and_a_breakpoint_from_before_still_checks_its_sha256(tmp_path: Path) -> None:
    """Round files are recorded by their BLAKE3 (as blob keys); a breakpoint written before that records
    `round_sha256` (bare sha256 hex), which is still read and checked; a record that names no digest is refused."""
    store = FakeStore()
    exp = make(tmp_path, _nodes(store), store, save_breakpoints=True, round_limit=3)
    exp.run()
    rounds = exp.experimentation_path() / "rounds"
    state_file = exp.breakpoint() / "breakpoint.json"
    state = json.loads(state_file.read_text())
    files = {r: (rounds / f"round_{r:04d}.safetensors").read_bytes() for r in (0, 1, 2)}
    assert state["round_digests"] == {str(r): "blake3-" + blake3.blake3(b).hexdigest() for r, b in files.items()}

    legacy = {k: v for k, v in state.items() if k != "round_digests"}
    legacy["round_sha256"] = {str(r): hashlib.sha256(b).hexdigest() for r, b in files.items()}
    state_file.write_text(json.dumps(legacy))
    resumed = Experiment.load_breakpoint(tmp_path, network=creds())
    assert torch.equal(resumed.aggregated_params()[1]["params"]["bias"], exp.aggregated_params()[1]["params"]["bias"])
    (rounds / "round_0000.safetensors").write_bytes(files[1])  # another round's valid file in its place
    with pytest.raises(RoundArchiveError, match="differ from the digest recorded"):
        resumed.aggregated_params()[0]

    legacy["round_sha256"] = {"1": "md5-" + "0" * 32}
    state_file.write_text(json.dumps(legacy))
    with pytest.raises(RoundArchiveError, match=r"differ from the digest recorded .*md5-0000"):
        Experiment.load_breakpoint(tmp_path, network=creds()).aggregated_params()[1]


def test_a_breakpoint_links_the_archived_round_and_keeps_it_when_the_round_is_run_again(tmp_path: Path) -> None:
    """`params.safetensors` of a breakpoint is the round file itself (a hard link, no second write); running the
    round again from an earlier breakpoint replaces the round file, and the later breakpoint keeps its own bytes."""
    store = FakeStore()
    exp = make(tmp_path, _nodes(store), store, save_breakpoints=True, round_limit=3)
    exp.run()
    root = exp.experimentation_path()
    round_2, point_3 = root / "rounds" / "round_0002.safetensors", root / "breakpoint_0003" / "params.safetensors"
    assert os.path.samefile(round_2, point_3) and os.stat(point_3).st_nlink == 2
    state = json.loads((root / "breakpoint_0003" / "breakpoint.json").read_text())
    assert state["format_version"] == 3
    digest = "blake3-" + blake3.blake3(point_3.read_bytes()).hexdigest()
    assert state["params_digest"] == state["round_digests"]["2"] == digest
    kept = point_3.read_bytes()

    early = Experiment.load_breakpoint(root / "breakpoint_0002", network=creds())
    early._requests = FakeRequests({"a": trainer(store, "a", 5.0, 10), "b": trainer(store, "b", 7.0, 30)})  # type: ignore[assignment]
    early._filestore = store  # type: ignore[assignment]
    early.set_save_breakpoints(False)  # else it would write its own breakpoint_0003 in place of this one
    assert early.run() == 1
    early._rounds.flush()  # the round file is written by a background thread
    assert round_2.read_bytes() != kept and point_3.read_bytes() == kept  # the round again, other updates
    resumed = Experiment.load_breakpoint(root / "breakpoint_0003", network=creds())
    assert torch.equal(resumed.aggregated_params()[2]["params"]["bias"], exp.aggregated_params()[2]["params"]["bias"])


def test_a_format_2_breakpoint_with_sha256_records_still_reads(tmp_path: Path) -> None:
    store = FakeStore()
    exp = make(tmp_path, _nodes(store), store, save_breakpoints=True, round_limit=2)
    exp.run()
    folder = exp.breakpoint()
    state = json.loads((folder / "breakpoint.json").read_text())
    state["format_version"] = 2
    for name, file in (("params", "params.safetensors"), ("algorithm", "algorithm.safetensors")):
        del state[f"{name}_digest"]
        state[f"{name}_sha256"] = hashlib.sha256((folder / file).read_bytes()).hexdigest()
    (folder / "breakpoint.json").write_text(json.dumps(state))
    resumed = Experiment.load_breakpoint(folder, network=creds())
    assert torch.equal(resumed._global_params["bias"], exp._global_params["bias"])  # type: ignore[index]
    state["params_sha256"] = "0" * 64
    (folder / "breakpoint.json").write_text(json.dumps(state))
    with pytest.raises(BreakpointError, match=r"params\.safetensors: contents differ from the recorded digest"):
        Experiment.load_breakpoint(folder, network=creds())


@pytest.mark.parametrize("record", [{"a": {"b": {"c": []}}}, float("nan"), 10**40, None, "blake3-" + "z" * 64])
def test_a_digest_record_that_is_no_digest_is_refused_not_a_crash(tmp_path: Path, record: object) -> None:
    """breakpoint.json edited by hand or damaged: a digest record of any JSON shape is refused with the file named."""
    store = FakeStore()
    exp = make(tmp_path, _nodes(store), store, save_breakpoints=True, round_limit=2)
    exp.run()
    folder = exp.breakpoint()
    state = json.loads((folder / "breakpoint.json").read_text())
    (folder / "breakpoint.json").write_text(json.dumps({**state, "round_digests": {"0": record}}))
    with pytest.raises(RoundArchiveError, match=r"round_0000\.safetensors: contents differ from the digest"):
        Experiment.load_breakpoint(folder, network=creds()).aggregated_params()[0]
    (folder / "breakpoint.json").write_text(json.dumps({**state, "params_digest": record}))
    with pytest.raises(BreakpointError, match=r"params\.safetensors: contents differ from the recorded digest"):
        Experiment.load_breakpoint(folder, network=creds())


def test_a_round_that_cannot_be_saved_does_not_stop_training(tmp_path: Path, caplog) -> None:
    store = FakeStore()
    exp = make(tmp_path, _nodes(store), store, round_limit=3)
    (exp.experimentation_path() / "rounds").write_text("not a folder")
    with caplog.at_level(logging.ERROR, logger="fedsilo.researcher.rounds"):
        assert exp.run() == 3
    assert "round 0's global model could not be saved" in caplog.text
    assert list(exp.aggregated_params()) == [2]  # the current round, from memory
    assert exp.aggregated_params()[2]["params"]["weight"].shape == (1, 2)


def test_experiment_paths_are_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = FakeStore()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FEDSILO_EXPERIMENTS", raising=False)
    exp = make(Path("relative/exps"), _nodes(store), store, round_limit=2)
    assert exp.experimentation_folder() == tmp_path.resolve() / "relative" / "exps"
    exp.run()
    point = exp.breakpoint()
    assert point.is_absolute() and point == tmp_path.resolve() / "relative/exps/Experiment_0000/breakpoint_0002"
    assert exp.set_experimentation_folder("other").is_absolute()

    monkeypatch.chdir(tmp_path / "relative")
    assert point.is_dir()  # still the same folder from elsewhere
    resumed = Experiment.load_breakpoint("exps", network=creds())
    assert resumed.experimentation_path() == point.parent
    assert resumed.breakpoint() == point
    assert list(resumed.aggregated_params()) == [0, 1]
    assert Experiment(network=creds()).experimentation_folder() == Path(os.getcwd()).resolve() / "experiments"


def _resident_pages(path: Path) -> tuple[int, int]:
    """(pages of `path` in the page cache, pages in all): mincore(2) on a mapping, which reads nothing."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    vec = ctypes.create_string_buffer(pages)
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap")
        try:
            if libc.mincore(address, size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
        finally:
            libc.munmap(address, size)
    finally:
        os.close(fd)
    return sum(b & 1 for b in vec.raw[:pages]), pages


def test_a_large_round_file_leaves_the_page_cache_once_written_and_reads_back(tmp_path: Path) -> None:
    """A large model's file is on disk and out of the page cache after the write (its pages go to the next write
    instead of fresh ones: rounds.release_page_cache); a small one is left cached; both read back equal."""
    from fedsilo.common.serialization import params_from_bytes
    from fedsilo.researcher.rounds import RECYCLE_BYTES, write_params

    large = {"w": torch.randn(RECYCLE_BYTES // 4 + 1024)}
    small = {"w": torch.randn(1024)}
    for name, params, cached in (("large", large, False), ("small", small, True)):
        path = tmp_path / f"{name}.safetensors"
        write_params(params, path)
        resident, pages = _resident_pages(path)
        assert (resident == pages) if cached else (resident == 0), (name, resident, pages)
        assert torch.equal(params_from_bytes(path.read_bytes())["w"], params["w"])
