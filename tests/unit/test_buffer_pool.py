"""`common.buffers.BufferPool`: receive buffers reused only once nothing refers to them."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsilo.common.buffers import BufferPool
from fedsilo.common.serialization import params_from_bytes, params_to_buffers

MB = 1 << 20


def _address(buf: memoryview) -> int:
    return np.frombuffer(buf, dtype=np.uint8).ctypes.data


def test_a_dropped_buffer_is_handed_out_again() -> None:
    pool = BufferPool(min_bytes=MB)
    buf = pool.take(8 * MB)
    first = _address(buf)
    del buf
    again = pool.take(8 * MB)
    assert _address(again) == first and len(again) == 8 * MB and again.format == "B" and not again.readonly


@pytest.mark.parametrize(
    "hold",
    [
        lambda buf: buf[8:20],  # a slice of the memoryview
        lambda buf: np.frombuffer(buf, dtype=np.uint8)[8:],
        lambda buf: torch.frombuffer(buf, dtype=torch.uint8)[8:],
        lambda buf: memoryview(buf).cast("B")[8:],
    ],
    ids=["memoryview-slice", "numpy", "torch", "memoryview-of-it"],
)
def test_a_buffer_still_referred_to_is_never_handed_out(hold) -> None:
    pool = BufferPool(min_bytes=MB)
    buf = pool.take(4 * MB)
    buf[8:12] = b"keep"
    held = hold(buf)
    first = _address(buf)
    del buf
    other = pool.take(4 * MB)
    other[8:12] = b"lost"
    assert _address(other) != first
    assert bytes(memoryview(held.numpy() if isinstance(held, torch.Tensor) else held).cast("B")[:4]) == b"keep"
    del held
    assert pool.idle_bytes == 4 * MB  # the first one, free now; the second is still held as `other`


def test_parsed_tensors_keep_their_buffer_until_dropped() -> None:
    """The researcher's case: an update parsed in place (views), folded, dropped; only then reused."""
    params = {"w": torch.randn(1000, 1100), "b": torch.arange(50, dtype=torch.int64)}
    payload = params_to_buffers(params).tobytes()
    pool = BufferPool(min_bytes=MB)
    buf = pool.take(len(payload))
    buf[:] = payload
    parsed = params_from_bytes(buf, copy=False)
    first = _address(buf)
    del buf
    other = pool.take(len(payload))
    other[:] = bytes(len(payload))  # written over: the parsed tensors must not see it
    assert _address(other) != first
    assert torch.equal(parsed["w"], params["w"]) and torch.equal(parsed["b"], params["b"])
    del parsed, other
    assert pool.take(len(payload)) is not None and pool.idle_bytes >= len(payload)


def test_small_buffers_are_not_pooled_and_sizes_must_be_close() -> None:
    pool = BufferPool(min_bytes=4 * MB)
    small = pool.take(MB)
    assert len(small) == MB and pool.held_bytes == 0
    buf = pool.take(16 * MB)
    first = _address(buf)
    del buf
    smaller = pool.take(8 * MB)  # half the size: a new buffer, not the idle 16 MB one
    assert _address(smaller) != first and len(smaller) == 8 * MB
    del smaller
    near = pool.take(15 * MB)  # within 1/8: the idle 16 MB buffer serves it
    assert _address(near) == first and len(near) == 15 * MB


def test_idle_buffers_past_keep_bytes_are_dropped_oldest_first() -> None:
    pool = BufferPool(keep_bytes=10 * MB, min_bytes=MB)
    held = [pool.take(4 * MB) for _ in range(5)]
    assert pool.held_bytes == 20 * MB and pool.idle_bytes == 0  # in use: all kept, whatever keep_bytes says
    addresses = [_address(b) for b in held]
    del held
    pool.take(2 * MB)  # a take trims: of 20 MB idle, the two newest 4 MB buffers stay (8 MB), then this one's 2
    assert pool.held_bytes == 10 * MB and pool.idle_bytes == 10 * MB
    assert _address(pool.take(4 * MB)) in addresses[3:]


@settings(max_examples=25, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["take", "drop"]), st.integers(1, 6)), max_size=40))
def test_no_two_holders_ever_share_memory(ops: list[tuple[str, int]]) -> None:
    """Any sequence of takes and drops: the buffers held at once never overlap, and each keeps what was written."""
    pool = BufferPool(keep_bytes=12 * MB, min_bytes=MB)
    held: list[tuple[memoryview, int]] = []
    for n, (op, size) in enumerate(ops):
        if op == "take":
            buf = pool.take(size * MB)
            buf[:8] = n.to_bytes(8, "little")
            held.append((buf, n))
        elif held:
            held.pop(size % len(held))
        spans = sorted((_address(b), _address(b) + len(b)) for b, _ in held)
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(spans))
        assert all(int.from_bytes(b[:8], "little") == mark for b, mark in held)


def test_threads_taking_at_once_get_distinct_buffers() -> None:
    pool = BufferPool(min_bytes=MB)
    seen: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def take() -> None:
        barrier.wait()
        for _ in range(20):
            buf = pool.take(2 * MB)
            buf[:8] = threading.get_ident().to_bytes(8, "little")
            with lock:
                seen.append(_address(buf))
            assert int.from_bytes(buf[:8], "little") == threading.get_ident()
            del buf

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 160 and pool.held_bytes <= 8 * 2 * MB  # never more buffers than takers at once


def test_trim_after_an_aggregator_let_go_of_every_update_keeps_keep_bytes() -> None:
    """The end of a round (`researcher.round`): a median kept all K updates, then freed them after the last take."""
    pool = BufferPool(keep_bytes=10 * MB, min_bytes=MB)
    updates = [pool.take(4 * MB) for _ in range(6)]
    still_used = updates.pop()
    assert pool.trim() == 24 * MB  # every one held: nothing dropped
    del updates
    assert pool.trim() == 8 * MB + 4 * MB  # two idle 4 MB buffers kept, the held one untouched
    assert pool.idle_bytes == 8 * MB
    still_used[:4] = b"mine"
    assert bytes(still_used[:4]) == b"mine"
