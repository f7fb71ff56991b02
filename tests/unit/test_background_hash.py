"""`common.hashing.BackgroundSha256` (downloads hashed on a helper thread) and `common.buffers.fresh_buffer`."""

from __future__ import annotations

import hashlib
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsilo.common.buffers import fresh_buffer
from fedsilo.common.hashing import BackgroundSha256


def _sha256_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "sha256"]


@settings(max_examples=60, deadline=None)
@given(blocks=st.lists(st.binary(max_size=5000), max_size=12), threaded=st.booleans())
def test_the_digest_is_hashlib_s_over_the_blocks_in_order(blocks: list[bytes], threaded: bool) -> None:
    digest = BackgroundSha256(threaded=threaded)
    for block in blocks:
        digest.update(memoryview(block))
    assert digest.hexdigest() == hashlib.sha256(b"".join(blocks)).hexdigest()
    assert digest.hexdigest() == hashlib.sha256(b"".join(blocks)).hexdigest()  # asked twice: the same answer


def test_views_into_one_buffer_filled_front_to_back_hash_as_the_whole() -> None:
    """The download's case: each block a view of the buffer, handed over as soon as it is filled."""
    data = bytes(range(256)) * 40_000  # 10 MB
    buf = fresh_buffer(len(data))
    digest = BackgroundSha256()
    for start in range(0, len(data), 1 << 20):
        buf[start : start + (1 << 20)] = data[start : start + (1 << 20)]
        digest.update(buf[start : start + (1 << 20)])
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    assert bytes(buf) == data


def test_an_abandoned_digest_leaves_no_thread_behind() -> None:
    """A download that fails half-way closes its digest (`with`): the helper thread ends either way."""
    before = len(_sha256_threads())
    with pytest.raises(RuntimeError), BackgroundSha256() as digest:
        digest.update(b"x" * 100_000)
        raise RuntimeError("the store went away")
    assert len(_sha256_threads()) == before
    with pytest.raises(ValueError, match="after hexdigest"):
        digest.update(b"more")
    digest.close()  # idempotent


def test_fresh_buffer_is_a_writable_contiguous_byte_view_of_the_asked_size() -> None:
    for size in (0, 1, 4 << 20):
        buf = fresh_buffer(size)
        assert (buf.nbytes, buf.format, buf.readonly, buf.contiguous) == (size, "B", False, True)
    buf = fresh_buffer(16)
    buf[:] = b"0123456789abcdef"
    assert bytes(buf[4:8]) == b"4567"
