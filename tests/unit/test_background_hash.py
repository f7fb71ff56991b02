"""`common.hashing.BackgroundDigest` (downloads hashed on a helper thread), the blob keys of `common.hashing`, and
`common.buffers.fresh_buffer`."""

from __future__ import annotations

import hashlib
import threading

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsilo.common.buffers import fresh_buffer
from fedsilo.common.hashing import (
    BackgroundDigest,
    blob_key,
    digest_bytes,
    digest_file,
    is_blob_key,
    new_digest,
    parse_blob_key,
)

REFERENCE = {
    "sha256": lambda data: hashlib.sha256(data).hexdigest(),
    "blake3": lambda data: blake3.blake3(data).hexdigest(),
}
"""Each digest by its own library: what fedsilo's helpers must agree with."""


def _hash_threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name]


@settings(max_examples=60, deadline=None)
@given(blocks=st.lists(st.binary(max_size=5000), max_size=12), threaded=st.booleans(),
       algorithm=st.sampled_from(["sha256", "blake3"]))  # fmt: skip
def test_the_digest_is_the_library_s_over_the_blocks_in_order(blocks: list[bytes], threaded: bool, algorithm: str
                                                              ) -> None:  # fmt: skip
    digest = BackgroundDigest(algorithm, threaded=threaded)  # type: ignore[arg-type]
    for block in blocks:
        digest.update(memoryview(block))
    whole = b"".join(blocks)
    assert digest.hexdigest() == REFERENCE[algorithm](whole) == digest_bytes(whole, algorithm)  # type: ignore[arg-type]
    assert digest.hexdigest() == REFERENCE[algorithm](whole)  # asked twice: the same answer


@pytest.mark.parametrize("algorithm", ["sha256", "blake3"])
def test_views_into_one_buffer_filled_front_to_back_hash_as_the_whole(algorithm: str, tmp_path) -> None:
    """The download's case: each block a view of the buffer, handed over as soon as it is filled."""
    data = bytes(range(256)) * 40_000  # 10 MB
    buf = fresh_buffer(len(data))
    digest = BackgroundDigest(algorithm)  # type: ignore[arg-type]
    for start in range(0, len(data), 1 << 20):
        buf[start : start + (1 << 20)] = data[start : start + (1 << 20)]
        digest.update(buf[start : start + (1 << 20)])
    assert digest.hexdigest() == REFERENCE[algorithm](data)
    assert bytes(buf) == data
    (tmp_path / "blob").write_bytes(data)
    assert digest_file(tmp_path / "blob", algorithm) == REFERENCE[algorithm](data)  # type: ignore[arg-type]


@pytest.mark.parametrize("algorithm", ["sha256", "blake3"])
def test_an_abandoned_digest_leaves_no_thread_behind(algorithm: str) -> None:
    """A download that fails half-way closes its digest (`with`): the helper thread ends either way."""
    before = len(_hash_threads(algorithm))
    with pytest.raises(RuntimeError), BackgroundDigest(algorithm) as digest:  # type: ignore[arg-type]
        digest.update(b"x" * 100_000)
        raise RuntimeError("the store went away")
    assert len(_hash_threads(algorithm)) == before
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


def test_blob_keys_name_their_digest_and_nothing_else_passes_for_one() -> None:
    hexdigest = "ab" * 32
    assert blob_key("sha256", hexdigest) == hexdigest  # as every blob stored before BLAKE3 is named
    assert blob_key("blake3", hexdigest) == "blake3-" + hexdigest
    assert parse_blob_key(hexdigest) == ("sha256", hexdigest)
    assert parse_blob_key("blake3-" + hexdigest) == ("blake3", hexdigest)
    for bad in ("", "AB" * 32, "ab" * 31, "ab" * 33, "blake3-" + "ab" * 31, "blake3-" + "AB" * 32,
                "sha256-" + hexdigest, "blake3-" + hexdigest + "/", "../" + hexdigest[3:], "blake3" + hexdigest,
                "blake2-" + hexdigest):
        assert parse_blob_key(bad) is None and not is_blob_key(bad), bad
    with pytest.raises(ValueError, match="unknown digest"):
        new_digest("md5")  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=80))
def test_a_key_parses_only_when_it_is_what_blob_key_makes(text: str) -> None:
    parsed = parse_blob_key(text)
    assert parsed is None or blob_key(*parsed) == text
