"""Blobs released by the parties that hold them (issue 11): the real store under its server, real tokens.

A blob goes once every uploader released it and no reader it was handed over to (`hold`) still holds it; a reader
it was only granted to reads it while the uploaders keep it. A release only ever drops the caller's own hold, and
an uploader's released blob counts in its quota until the blob is gone."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from fedsilo.common.errors import TransferError
from fedsilo.common.processes import free_port
from fedsilo.network import provision
from fedsilo.network.filestore_client import BlobTransferError, FileStoreClient
from fedsilo.network.messages import BlobRef
from tests.support.procs import NetworkHandle

QUOTA_BLOBS = 4
PARTIES = ("node-a", "node-b", "greedy", "friend", "outsider")


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetworkHandle]:
    netdir = tmp_path_factory.mktemp("fs-release") / "network"
    provision.init_network(netdir, mqtt_port=free_port(), http_port=free_port(), broker="embedded")
    provision.save_config(netdir, provision.load_config(netdir).model_copy(update={"quota_blobs": QUOTA_BLOBS}))
    for name in PARTIES:
        provision.add_party(netdir, name, "node")
    handle = NetworkHandle(netdir=netdir, broker="embedded", log_path=netdir.parent / "network.log")
    handle.start()
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def clients(net: NetworkHandle) -> Iterator[dict[str, FileStoreClient]]:
    made = {name: FileStoreClient(net.credentials(name).filestore) for name in ("researcher", *PARTIES)}
    yield made
    for client in made.values():
        client.close()


def _on_disk(net: NetworkHandle, ref: BlobRef) -> bool:
    return (net.netdir / "filestore" / "blobs" / ref.key[-64:-62] / ref.key).exists()


def _readable(client: FileStoreClient, ref: BlobRef) -> bool:
    try:
        return client.download_bytes(ref) is not None
    except BlobTransferError as exc:
        assert exc.status == 404, exc
        return False


def test_an_update_goes_once_its_node_and_the_researcher_released_it(net, clients) -> None:
    node, researcher = clients["node-a"], clients["researcher"]
    ref = node.upload_bytes(os.urandom(3 << 20), readers=["researcher"], hold=True)  # over SMALL_BLOB: the POST path
    assert node.release(ref) is False  # the researcher has not read it yet: it stays
    assert _readable(researcher, ref) and _on_disk(net, ref)
    assert researcher.release(ref) is True
    assert not _on_disk(net, ref)
    assert not _readable(researcher, ref) and not _readable(node, ref)
    assert researcher.release(ref) is False  # gone: a second release is answered, and changes nothing


def test_a_global_model_goes_when_the_researcher_released_it_whoever_was_granted_it(net, clients) -> None:
    """The nodes only read the model: a node's release drops its own access, and the researcher's release removes
    the blob although a node that never released it was granted it (a node that had not read it by then is too
    late for the round anyway). A raw researcher that keeps its hold can send the same ref in later requests."""
    researcher, a, b = clients["researcher"], clients["node-a"], clients["node-b"]
    ref = researcher.upload_bytes(b"global model, round 3", readers=["node-a", "node-b"])
    assert a.release(ref) is False
    assert not _readable(a, ref)  # node-a's access is gone with its release
    assert _readable(b, ref) and _readable(b, ref)  # node-b's is not, and reading does not use it up
    assert researcher.release(ref) is True
    assert not _on_disk(net, ref) and not _readable(b, ref)


def test_readers_it_was_handed_to_hold_it_and_a_later_hand_over_makes_readers_hold(net, clients) -> None:
    uploader, a, b = clients["researcher"], clients["node-a"], clients["node-b"]
    ref = uploader.upload_bytes(b"handed to two", readers=["node-a"])
    assert uploader.upload_bytes(b"handed to two", readers=["node-a", "node-b"], hold=True) == ref  # handed over
    assert uploader.release(ref) is False and uploader.release(ref) is False  # both its uploads let go
    assert a.release(ref) is False and _readable(b, ref)
    assert b.release(ref) is True


def test_a_party_releases_only_its_own_hold(net, clients) -> None:
    """An outsider (valid token, no access) is answered 404 as for a missing blob, and the blob stays; a reader
    releasing twice, or releasing what it was never granted, changes nothing for the others."""
    node, researcher, outsider = clients["node-a"], clients["researcher"], clients["outsider"]
    ref = node.upload_bytes(b"not the outsider's", readers=["researcher"], hold=True)
    token = net.credentials("outsider").filestore.token
    raw = requests.delete(f"{net.filestore_url}/api/v1/blobs/{ref.key}", headers={"Authorization": f"Token {token}"},
                          verify=net.ca_path, timeout=30)  # fmt: skip
    assert raw.status_code == 404 and "that you may read" in raw.json()["error"]
    assert outsider.release(ref) is False
    assert researcher.release(ref) is False and researcher.release(ref) is False  # its hold went once
    assert _readable(node, ref) and _on_disk(net, ref)  # the uploader has not released: it stays
    assert node.release(ref) is True


def test_the_same_bytes_uploaded_by_two_parties_stay_until_both_released(net, clients) -> None:
    a, b = clients["node-a"], clients["node-b"]
    ref = a.upload_bytes(b"the same bytes from two hospitals")
    assert b.upload_bytes(b"the same bytes from two hospitals") == ref
    assert a.release(ref) is False
    assert _readable(b, ref)
    assert b.release(ref) is True


def test_an_upload_after_a_release_holds_the_blob_again(net, clients) -> None:
    node, researcher = clients["node-a"], clients["researcher"]
    ref = node.upload_bytes(b"uploaded, released, uploaded again", readers=["researcher"], hold=True)
    assert node.release(ref) is False
    assert node.upload_bytes(b"uploaded, released, uploaded again", readers=["researcher"], hold=True) == ref
    assert researcher.release(ref) is False  # the node holds it again
    assert _readable(node, ref)
    assert node.release(ref) is True


def test_each_upload_by_one_party_holds_the_blob_once(net, clients) -> None:
    """Two experiments of one researcher start from the same initial model: the same bytes, uploaded twice by the
    same party. The first to end its round releases its upload; the blob stays for the other's nodes."""
    researcher, node = clients["researcher"], clients["node-a"]
    first = researcher.upload_bytes(b"the same initial model", readers=["node-a"])
    assert researcher.upload_bytes(b"the same initial model", readers=["node-a"]) == first
    assert researcher.release(first) is False  # the other experiment's upload still holds it
    assert _readable(node, first)
    assert researcher.release(first) is True
    assert researcher.release(first) is False  # gone: nothing left to let go


def test_released_blobs_others_still_hold_count_in_the_uploaders_quota(net, clients) -> None:
    """Upload, grant to a friend, release: the blob is the friend's to keep, and still the uploader's to pay for,
    so a quota cannot be passed by handing blobs over."""
    greedy, friend = clients["greedy"], clients["friend"]
    refs = [greedy.upload_bytes(f"handed over {i}".encode(), readers=["friend"], hold=True) for i in range(QUOTA_BLOBS)]
    assert [greedy.release(ref) for ref in refs] == [False] * QUOTA_BLOBS
    with pytest.raises(TransferError) as err:
        greedy.upload_bytes(b"one more")
    assert err.value.status == 507 and f"stores {QUOTA_BLOBS} blobs" in str(err.value)
    assert friend.release(refs[0]) is True  # the friend is done with one: it goes, and the room comes back
    assert greedy.upload_bytes(b"one more").size == len(b"one more")


def test_an_inline_ref_is_never_sent_to_the_store(clients) -> None:
    assert clients["node-a"].release(BlobRef.inline(b"carried in the message")) is False


def test_release_of_a_blob_being_downloaded_leaves_that_download_whole(net, clients, tmp_path: Path) -> None:
    """The last holder releases while another party's download of it is under way (the store unlinks the file; an
    open file stays readable): the download ends verified, and the next one is answered 404."""
    researcher, node = clients["researcher"], clients["node-a"]
    data = os.urandom(8 << 20)
    ref = researcher.upload_bytes(data, readers=["node-a"], hold=True)
    assert researcher.release(ref) is False
    token = net.credentials("node-a").filestore.token
    with requests.get(f"{net.filestore_url}/api/v1/blobs/{ref.key}", headers={"Authorization": f"Token {token}"},
                      verify=net.ca_path, stream=True, timeout=60) as slow:  # fmt: skip
        first = slow.raw.read(1 << 20)
        with FileStoreClient(net.credentials("node-a").filestore) as other:
            assert other.release(ref) is True
        rest = slow.raw.read()
    assert first + rest == data
    assert not _readable(node, ref)


def test_a_malformed_release_or_hold_header_is_refused_or_ignored(net, clients) -> None:
    """A DELETE naming no blob key is a 400 (before any row is read); a hold header other than "1" hands nothing
    over."""
    token = net.credentials("node-a").filestore.token
    bad = requests.delete(f"{net.filestore_url}/api/v1/blobs/{'x' * 70}", headers={"Authorization": f"Token {token}"},
                          verify=net.ca_path, timeout=30)  # fmt: skip
    assert bad.status_code == 400 and "is not a blob key" in bad.json()["error"]
    body = b"hold header in another spelling"
    put = requests.put(f"{net.filestore_url}/api/v1/blobs/{BlobRef.inline(body).key}", data=body,
                       headers={"Authorization": f"Token {token}", "X-Fedsilo-Readers": "researcher",
                                "X-Fedsilo-Readers-Hold": "yes", "Content-Type": "application/octet-stream"},
                       verify=net.ca_path, timeout=30)  # fmt: skip
    assert put.status_code == 201, put.text
    ref = BlobRef.inline(body).lean()
    assert clients["node-a"].release(ref) is True  # the researcher was only granted it: nothing held it back
