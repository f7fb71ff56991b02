"""The blob path of issue 11: parameters serialised from tensor memory, hashed once, uploads hashed as they
arrive at the store, downloads read straight into the blob's buffer and parsed in place; and what a hostile
payload, store or uploader gets from each (a clear error, nothing left behind)."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from safetensors.torch import save as st_save

from fedsilo.common.config import Timeouts
from fedsilo.common.errors import SerializationError
from fedsilo.common.hashing import digest_bytes
from fedsilo.common.serialization import params_from_bytes, params_to_buffers, params_to_bytes
from fedsilo.network import provision
from fedsilo.network.credentials import FileStoreSettings
from fedsilo.network.filestore.spool import HashingSpool
from fedsilo.network.filestore_client import BlobTransferError, FileStoreClient
from fedsilo.network.messages import BlobRef
from fedsilo.network.pki import client_context
from tests.support.procs import NetworkHandle

QUOTA_BYTES = 6 << 20


def _every_dtype() -> dict[str, torch.Tensor]:
    return {
        "w": torch.randn(5, 7).t(),  # not contiguous
        "b": torch.randn(3, dtype=torch.float64),
        "h": torch.randn(4).half(),
        "bf": torch.randn(3).bfloat16(),
        "i": torch.arange(5),
        "i8": torch.tensor([-1, 2, 3], dtype=torch.int8),
        "u8": torch.tensor([250], dtype=torch.uint8),
        "mask": torch.tensor([True, False]),
        "c": torch.randn(2, dtype=torch.complex64),
        "empty": torch.zeros(0, 3),
    }


# ---------------------------------------------------------------------------------------- serialisation
@pytest.mark.parametrize("metadata", [None, {"round": "3"}])
def test_buffers_are_safetensors_bytes(metadata: dict[str, str] | None) -> None:
    params = _every_dtype()
    blob = params_to_buffers(params, metadata)
    expected = st_save({k: v.contiguous() for k, v in params.items()}, metadata=metadata)
    assert blob.tobytes() == expected == params_to_bytes(params, metadata)  # content hashes did not change
    assert blob.size == len(blob) == len(expected)
    assert blob.digest("sha256") == hashlib.sha256(expected).hexdigest()
    assert b"".join(bytes(chunk) for chunk in blob) == expected


def test_buffers_are_the_tensors_memory() -> None:
    weight = torch.randn(256, 256)
    blob = params_to_buffers({"weight": weight})
    (data,) = blob.buffers[1:]
    assert np.frombuffer(data, dtype=np.uint8).ctypes.data == weight.data_ptr()  # not a copy


def test_in_place_parse_views_the_downloaded_buffer() -> None:
    params = _every_dtype()
    buf = bytearray(params_to_bytes(params))
    got = params_from_bytes(buf, copy=False)
    for name, value in params.items():
        assert torch.equal(got[name], value), name
    start = np.frombuffer(buf, dtype=np.uint8).ctypes.data
    assert start <= got["w"].data_ptr() < start + len(buf)  # a view: no copy
    got["w"].zero_()
    assert params_from_bytes(bytes(buf))["w"].abs().sum() == 0


def test_parse_of_bytes_copies() -> None:
    data = params_to_bytes({"w": torch.ones(4)})
    for copy in (True, False):  # immutable bytes are never viewed, whatever `copy` says
        got = params_from_bytes(data, copy=copy)
        got["w"].add_(1)  # writable, and the bytes do not change
        assert torch.equal(params_from_bytes(data)["w"], torch.ones(4))


def _payload(header: dict, data: bytes, pad: bool) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data


def test_misaligned_tensor_from_another_writer_is_copied() -> None:
    """A writer that does not pad its header puts float32 data at an odd address: read by copy, correctly."""
    values = torch.tensor([1.5, -2.0, 3.25])
    header = {"x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "v": {"dtype": "F32", "shape": [3], "data_offsets": [1, 13]}}  # fmt: skip
    payload = bytearray(_payload(header, b"\x07" + values.numpy().tobytes(), pad=False))
    got = params_from_bytes(payload, copy=False)
    assert torch.equal(got["v"], values) and got["x"].tolist() == [7]


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F32", "shape": [4], "data_offsets": [0, 64]},  # past the payload's end
        {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 16]},  # a shape larger than its span
        {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]},
        {"dtype": "PICKLE", "shape": [4], "data_offsets": [0, 16]},
    ],
)
def test_hostile_header_refused_before_a_view_is_made(entry: dict) -> None:
    payload = bytearray(_payload({"w": entry}, bytes(16), pad=True))
    with pytest.raises(SerializationError, match="refused"):
        params_from_bytes(payload, copy=False)


def test_not_a_tensor_is_refused_on_serialise() -> None:
    with pytest.raises(SerializationError, match="'step' is not a tensor"):
        params_to_buffers({"w": torch.zeros(2), "step": 3})  # type: ignore[dict-item]


# ---------------------------------------------------------------------------------------- the store's spool
@pytest.mark.parametrize("algorithm", ["sha256", "blake3"])
def test_spool_hashes_what_is_written(tmp_path: Path, algorithm: str) -> None:
    with HashingSpool(tmp_path, algorithm=algorithm) as spool:  # type: ignore[arg-type]
        spool.write(b"abc")
        spool.write(b"def")
        spool.seek(0)
        assert spool.read() == b"abcdef" and spool.size == 6
        assert spool.hexdigest() == digest_bytes(b"abcdef", algorithm)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []  # closed without being handed over: removed
    with HashingSpool(tmp_path) as spool:
        spool.write(b"kept")
        name = spool.detach()
    assert Path(name).read_bytes() == b"kept"


# ---------------------------------------------------------------------------------------- against the store
@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetworkHandle]:
    base = tmp_path_factory.mktemp("blob-stream")
    netdir = base / "network"
    from fedsilo.common.processes import free_port

    provision.init_network(netdir, mqtt_port=free_port(), http_port=free_port(), broker="embedded",
                           max_upload_bytes=32 << 20)  # fmt: skip
    provision.save_config(netdir, provision.load_config(netdir).model_copy(update={"quota_bytes": QUOTA_BYTES}))
    provision.add_party(netdir, "greedy", "node")
    handle = NetworkHandle(netdir=netdir, broker="embedded", log_path=base / "network.log")
    handle.start()
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def client(net: NetworkHandle) -> Iterator[FileStoreClient]:
    with FileStoreClient(net.credentials("researcher").filestore) as c:
        yield c


def _tmp_files(net: NetworkHandle) -> list[str]:
    return os.listdir(net.netdir / "filestore" / "tmp")


def test_buffers_uploaded_and_parsed_in_place(client: FileStoreClient) -> None:
    params = {"w": torch.randn(600, 1000), "b": torch.randn(1000)}  # 2.4 MB: past the HEAD-first size
    blob = params_to_buffers(params)
    ref = client.upload_bytes(blob)
    assert ref == BlobRef(blake3=digest_bytes(blob.tobytes(), "blake3"), size=blob.size)
    buf = client.download_buffer(ref)
    assert isinstance(buf, memoryview) and not buf.readonly and buf == blob.tobytes()  # writable: parsed in place
    got = params_from_bytes(buf, copy=False)
    assert all(torch.equal(got[k], v) for k, v in params.items())
    assert client.download_bytes(ref) == bytes(buf)


def test_refused_uploads_leave_no_spool(net: NetworkHandle, client: FileStoreClient) -> None:
    """The body goes to a named file as it arrives: a hash mismatch or a quota refusal removes it."""
    data = os.urandom(3 << 20)
    url = f"{net.filestore_url}/api/v1/blobs/{'0' * 64}"
    r = client._session.put(url, data=data, headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 400 and "sha256 mismatch" in r.json()["error"]
    assert _tmp_files(net) == []
    with FileStoreClient(net.credentials("greedy").filestore) as greedy:
        greedy.upload_bytes(os.urandom(4 << 20))
        with pytest.raises(BlobTransferError, match="quota exceeded") as err:
            greedy.upload_bytes(os.urandom(4 << 20))
    assert err.value.status == 507
    assert _tmp_files(net) == []


def test_upload_cut_off_midway_leaves_no_spool(net: NetworkHandle) -> None:
    """A party that announces 8 MB, sends 1 MB and hangs up: its spool file is removed, the store answers on."""
    creds = net.credentials("greedy")
    host, port = net.filestore_url.split("//")[1].split(":")
    ctx = client_context(creds.filestore.tls)  # type: ignore[arg-type]
    with socket.create_connection((host, int(port))) as raw, ctx.wrap_socket(raw, server_hostname=host) as s:
        s.sendall((f"PUT /api/v1/blobs/{'1' * 64} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {8 << 20}\r\n"
                   f"Authorization: Token {creds.filestore.token}\r\n\r\n").encode() + os.urandom(1 << 20))  # fmt: skip
        deadline = time.monotonic() + 30
        while not _tmp_files(net) and time.monotonic() < deadline:  # the body is arriving
            time.sleep(0.05)
        assert _tmp_files(net), "the store spools an upload as it arrives"
    deadline = time.monotonic() + 30
    while _tmp_files(net) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _tmp_files(net) == []
    assert requests.get(f"{net.filestore_url}/api/v1/health", verify=str(net.ca_path)).status_code == 200


# ---------------------------------------------------------------------------------------- a hostile store
class _Hostile(http.server.BaseHTTPRequestHandler):
    """Serves `server.body` for any GET, announcing `server.length` bytes; `server.stall` keeps the rest back."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        # What to serve, read once: the client has the whole body before this handler returns, and the next case's
        # `_serve` may change the server's settings meanwhile (a `stall` read after the body was sent kept this
        # connection's thread waiting, so the next request on it went unanswered).
        srv = types.SimpleNamespace(body=self.server.body, length=self.server.length, stall=self.server.stall,
                                    release=self.server.release)  # fmt: skip
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(srv.length if srv.length is not None else len(srv.body)))
        self.end_headers()
        self.wfile.write(srv.body[: len(srv.body) // 2] if srv.stall else srv.body)
        self.wfile.flush()
        if srv.stall:
            srv.release.wait(10)
        if srv.length is not None and srv.length != len(srv.body):
            self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def hostile() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    server.daemon_threads = True
    server.connections = 0
    accept = server.get_request

    def counted() -> tuple[socket.socket, object]:
        server.connections += 1
        return accept()

    server.get_request = counted  # type: ignore[method-assign]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def _serve(server: http.server.ThreadingHTTPServer, body: bytes, length: int | None = None, stall: bool = False):
    server.body, server.length, server.stall = body, length, stall
    server.release = threading.Event()


def _hostile_client(server: http.server.ThreadingHTTPServer, transfer: float = 30.0) -> FileStoreClient:
    url = f"http://127.0.0.1:{server.server_address[1]}"
    return FileStoreClient(FileStoreSettings(url=url, token="t"), Timeouts(transfer=transfer))


def _ref(data: bytes) -> BlobRef:
    return BlobRef(sha256=hashlib.sha256(data).hexdigest(), size=len(data))


def test_download_refuses_what_the_reference_does_not_name(hostile: http.server.ThreadingHTTPServer) -> None:
    data = os.urandom(3 << 20)
    with _hostile_client(hostile) as c:
        _serve(hostile, data + b"trailing")
        with pytest.raises(BlobTransferError, match=f"holds {len(data) + 8} bytes, the reference names {len(data)}"):
            c.download_buffer(_ref(data))
        _serve(hostile, data[:-10], length=len(data))  # announces the right size, hangs up short of it
        with pytest.raises(BlobTransferError, match=f"expected {len(data)}|of {len(data)} bytes"):
            c.download_buffer(_ref(data))
        _serve(hostile, os.urandom(len(data)))
        with pytest.raises(BlobTransferError, match="refusing it"):
            c.download_buffer(_ref(data))
        with pytest.raises(BlobTransferError, match="over the allowed"):
            c.download_buffer(_ref(data), max_bytes=1 << 20)


def test_a_hostile_body_of_a_blob_hashed_on_a_helper_thread_is_refused_and_leaves_no_thread(
    hostile: http.server.ThreadingHTTPServer,
) -> None:
    """From `BACKGROUND_HASH` on, a download is hashed on a helper thread: a body cut short, other bytes, or a
    stall are refused all the same, and the thread ends with the download."""
    from fedsilo.network.filestore_client import BACKGROUND_HASH

    data = os.urandom(BACKGROUND_HASH + (1 << 20))

    def helpers() -> int:
        return sum(t.name == "sha256" for t in threading.enumerate())

    before = helpers()
    with _hostile_client(hostile, transfer=1.0) as c:
        _serve(hostile, data[:-10], length=len(data))
        with pytest.raises(BlobTransferError, match=f"expected {len(data)}|of {len(data)} bytes"):
            c.download_buffer(_ref(data))
        _serve(hostile, os.urandom(len(data)))
        with pytest.raises(BlobTransferError, match="refusing it"):
            c.download_buffer(_ref(data))
        _serve(hostile, data, stall=True)
        try:
            with pytest.raises(BlobTransferError, match="failed after"):
                c.download_buffer(_ref(data))
        finally:
            hostile.release.set()
        _serve(hostile, data)
        assert c.download_buffer(_ref(data)) == data
    assert helpers() == before


def test_a_size_claimed_in_a_reference_is_not_allocated(hostile: http.server.ThreadingHTTPServer) -> None:
    """A request naming a stored blob with a size of 32 TiB: refused on the store's Content-Length, before
    a buffer of the claimed size is made (a node fetches what a researcher's message names)."""
    data = os.urandom(1 << 20)
    _serve(hostile, data)
    claim = BlobRef(sha256=hashlib.sha256(data).hexdigest(), size=1 << 45)
    with _hostile_client(hostile) as c, pytest.raises(BlobTransferError, match="the reference names 35184372088832"):
        c.download_buffer(claim)


def test_stalled_download_is_a_transfer_error(hostile: http.server.ThreadingHTTPServer) -> None:
    data = os.urandom(1 << 20)
    _serve(hostile, data, stall=True)
    with _hostile_client(hostile, transfer=1.0) as c:
        try:
            with pytest.raises(BlobTransferError, match="failed after"):
                c.download_buffer(_ref(data))
        finally:
            hostile.release.set()


def test_downloads_share_one_connection(hostile: http.server.ThreadingHTTPServer, tmp_path: Path) -> None:
    """Reading the body straight from the socket leaves the connection to the next call."""
    data = os.urandom(2 << 20)
    _serve(hostile, data)
    with _hostile_client(hostile) as c:
        before = hostile.connections
        assert c.download_buffer(_ref(data)) == data
        assert c.download_bytes(_ref(data)) == data
        assert c.download_to(_ref(data), tmp_path / "blob").read_bytes() == data
        assert hostile.connections - before == 1



def test_node_fetches_blobs_into_buffers_it_owns(client: FileStoreClient) -> None:
    """The daemon's download is not copied once more before the worker's frame (node/transfer.py)."""
    from fedsilo.node.transfer import fetch_blobs

    data = params_to_bytes({"w": torch.randn(1000, 600)})
    got = fetch_blobs(client, {"params": client.upload_bytes(data)})
    assert type(got["params"]) is memoryview and not got["params"].readonly and got["params"] == data


@pytest.mark.skipif(not os.path.exists("/lib/x86_64-linux-gnu/libc.so.6") and not os.path.exists("/lib64/libc.so.6"),
                    reason="glibc only")  # fmt: skip
def test_store_takes_its_transfer_buffers_from_the_heap() -> None:
    """serve.py sets glibc's mmap threshold above a transfer's buffers (the store's CPU per upload: -35 %)."""
    from fedsilo.network.filestore.serve import MMAP_THRESHOLD, tune_malloc

    assert MMAP_THRESHOLD >= 1 << 20  # a body block; TLS records and h11 buffers are smaller
    assert tune_malloc() is True
