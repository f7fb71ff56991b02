"""Signed messages against a live node daemon and a live researcher connection, on both brokers.

The hostile parties here hold valid credentials of their own: a researcher that forges signatures or
replays a request, a researcher the node or a dataset does not take, and a node that speaks for another."""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedsilo.common.signing import generate_key, private_from_b64, sign_json
from fedsilo.network import topics
from fedsilo.network.credentials import Credentials
from fedsilo.network.messages import Message, PingReply, PingRequest, Presence, SearchRequest
from fedsilo.network.messaging import Messaging
from fedsilo.node.audit import AuditLog
from fedsilo.node.config import NodeConfig
from fedsilo.node.datasets import DatasetStore
from fedsilo.node.plans import PlanStore
from fedsilo.researcher.requests import Requests
from tests.support.brokers import BOTH
from tests.support.client import RawResearcher
from tests.support.plans import LOGREG_PLAN
from tests.support.procs import FEDSILO, NetworkHandle, NodeHandle, start_network, start_node
from tests.support.tables import write_sign_csv

NODE = "sig-node"
WAIT = 30.0


@dataclass
class Site:
    net: NetworkHandle
    node: NodeHandle
    nodedir: Path
    dataset_id: str
    client: RawResearcher  # allowed on the node and on the dataset
    others: dict[str, RawResearcher]  # "outsider": not in [node] researchers; "guest": on the node, not the dataset

    def refusals(self, request_id: str) -> list[dict]:
        return [e for e in AuditLog(self.nodedir).list(event="request_refused")
                if e["details"].get("request_id") == request_id]  # fmt: skip

    def answer(self, request_id: str) -> Message:
        """The node's answer to `request_id`; when none comes, the failure carries the node's last log lines (one
        full-suite run of 2026-12-01 saw no answer to a forged request within WAIT, and pytest had removed the
        log by the time anyone looked)."""
        try:
            return self.client.wait(request_id, ("error", "ping_reply"), timeout=WAIT)
        except TimeoutError as exc:
            log = self.nodedir / "logs" / "node.log"
            tail = log.read_text(errors="replace").splitlines()[-40:] if log.exists() else ["(no node.log)"]
            raise AssertionError(f"{exc}; the node's log ends:\n" + "\n".join(tail)) from None


@pytest.fixture(scope="module", params=BOTH)
def site(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp(f"signatures-{request.param}")
    net = start_network(root / "net", broker=request.param)
    data = root / "data"
    data.mkdir()
    write_sign_csv(data / "d.csv", 48)
    nodedir = root / NODE
    subprocess.run([*FEDSILO, "node", "init", "--dir", str(nodedir), "--name", NODE, "--network", str(net.netdir),
                    "--data-root", str(data), "--threads", "1"], check=True, capture_output=True)  # fmt: skip
    cfg = NodeConfig.load(nodedir)
    cfg.node.researchers = ["raw-researcher", "guest"]
    cfg.save()
    ds = DatasetStore(nodedir).add("d", ["sig"], "csv", data / "d.csv", added_by="test")
    # Researchers made after the node: it learns their keys from the retained roster, not its credentials.
    client = RawResearcher.for_network(net)
    others = {name: RawResearcher.for_network(net, name) for name in ("outsider", "guest")}
    site = Site(net, start_node(nodedir), nodedir, ds["dataset_id"], client, others)
    yield site
    site.node.stop()  # the node now: a test restarts it (a handle kept from before leaked that daemon, every run)
    for c in (client, *others.values()):
        c.close()
    net.stop()


def node_key(site: Site) -> Ed25519PrivateKey:
    return private_from_b64(Credentials.load(site.nodedir / "network.json").signing_key or "")


def test_forged_requests_are_refused_answered_and_audited(site: Site) -> None:
    me = site.client.party
    cases = {
        "FS104": lambda m: site.client.send_raw(NODE, m.to_json(), sign=False),  # unsigned
        "FS105": lambda m: site.client.send_forged(NODE, m, "stranger", generate_key()),  # valid, unknown key
        "FS106": lambda m: site.client.send_forged(NODE, m, NODE, node_key(site)),  # a node's key
        "FS104 ": lambda m: site.client.send_forged(NODE, m, me, generate_key()),  # bad signature for `me`
    }
    for code, send in cases.items():
        msg = PingRequest(sender=me)
        send(msg)
        err = site.answer(msg.request_id)
        assert err.kind == "error" and err.code == code.strip(), (code, err)
        refused = site.refusals(msg.request_id)
        assert refused and refused[0]["actor"] == f"researcher:{me}" and refused[0]["details"]["code"] == code.strip()
    assert site.client.ping(NODE).node_id == NODE, "the node stopped answering after the forgeries"


def _replayed(site: Site, msg: Message) -> None:
    """Send `msg` again byte for byte (Ed25519 is deterministic), then a fresh ping as a barrier: the node
    handles one researcher's requests in order, so the barrier's answer comes after any answer to `msg`."""
    site.client.send(NODE, msg)
    barrier = site.client.ping(NODE)
    assert barrier.node_id == NODE
    assert site.client.received(msg.request_id) == [], "the replayed request was answered"
    assert any(e["details"]["reason"].startswith("replay") for e in site.refusals(msg.request_id))


def test_a_replayed_request_is_refused_also_after_a_node_restart(site: Site) -> None:
    msg = PingRequest(sender=site.client.party)
    assert site.client.ask(NODE, msg, ("ping_reply",), timeout=WAIT).in_reply_to == msg.request_id
    _replayed(site, msg)
    site.node.stop()
    site.node = start_node(site.nodedir)
    _replayed(site, msg)
    assert len([e for e in site.refusals(msg.request_id) if e["details"]["reason"].startswith("replay")]) == 2
    # what a researcher does when it has no answer: the same id, a fresh timestamp (and signature)
    again = msg.model_copy(update={"timestamp": time.time()})
    assert site.client.ask(NODE, again, ("ping_reply",), timeout=WAIT).in_reply_to == msg.request_id


def test_a_round_records_its_verified_signer(site: Site) -> None:
    params = {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}
    req = site.client.train_request(LOGREG_PLAN, "HeartPlan", site.dataset_id, params=params, job_id="signed")
    plans = PlanStore(site.nodedir)
    plans.submit(LOGREG_PLAN, "HeartPlan", site.client.party)
    plans.approve(req.plan.sha256, by="test", note="")
    reply = site.client.ask(NODE, req, ("train_reply", "error"), timeout=120)
    assert reply.kind == "train_reply", reply
    assert reply.signer == NODE  # verified by the client's connection, as a researcher's
    rounds = [e for e in AuditLog(site.nodedir).list(event="round_executed")
              if e["details"]["request_id"] == req.request_id]  # fmt: skip
    assert rounds and rounds[0]["details"]["signed_by"] == site.client.party
    assert len(rounds[0]["details"]["signature"]) == 88


def test_a_researcher_the_node_does_not_take_is_refused(site: Site) -> None:
    outsider = site.others["outsider"]
    msg = PingRequest(sender=outsider.party)
    err = outsider.ask(NODE, msg, ("error", "ping_reply"), timeout=WAIT)
    assert err.kind == "error" and err.code == "FS107", err
    assert site.refusals(msg.request_id)[0]["actor"] == "researcher:outsider"


def _cli(site: Site, *args: str) -> str:
    done = subprocess.run([*FEDSILO, "node", "dataset", *args[:1], "--dir", str(site.nodedir), *args[1:]],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return done.stdout


def test_a_researcher_not_allowed_on_a_dataset_is_refused_and_does_not_see_it(site: Site) -> None:
    guest, ds = site.others["guest"], site.dataset_id
    assert "allowed: raw-researcher" in _cli(site, "allow", ds, site.client.party)
    try:
        found = guest.ask(NODE, SearchRequest(sender=guest.party, tags=["sig"]), ("search_reply",), timeout=WAIT)
        assert found.datasets == []
        req = guest.train_request(LOGREG_PLAN, "HeartPlan", ds, params={"weight": torch.zeros(2, 4),
                                                                          "bias": torch.zeros(2)})  # fmt: skip
        err = guest.ask(NODE, req, ("error", "task_ack"), timeout=WAIT)
        assert err.kind == "error" and err.code == "FS210" and err.job_id == req.job_id, err
        assert site.refusals(req.request_id)[0]["details"]["dataset_id"] == ds
        mine = site.client.ask(NODE, SearchRequest(sender=site.client.party, tags=["sig"]), ("search_reply",))
        assert [d.dataset_id for d in mine.datasets] == [ds]
        assert "denied: raw-researcher" in _cli(site, "deny", ds, site.client.party)
        mine = site.client.ask(NODE, SearchRequest(sender=site.client.party, tags=["sig"]), ("search_reply",))
        assert mine.datasets == []
        changes = AuditLog(site.nodedir).list(event="dataset_access_changed")
        assert [c["details"]["change"] for c in changes[-2:]] == ["allow", "deny"]
    finally:
        _cli(site, "open", ds)
    found = guest.ask(NODE, SearchRequest(sender=guest.party, tags=["sig"]), ("search_reply",), timeout=WAIT)
    assert [d.dataset_id for d in found.datasets] == [ds]


def test_the_researcher_takes_replies_and_presence_only_signed_by_the_node_they_name(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    net = site.net
    for name in ("sig-a", "sig-b"):
        if not net.credentials_path(name).is_file():
            net.add_party(name, "node")
    a = Messaging.of(net.credentials("sig-a"), on_message=lambda *_: None)
    b = Messaging.of(net.credentials("sig-b"), on_message=lambda *_: None)
    a.start(WAIT)
    b.start(WAIT)
    req = Requests(net.credentials("researcher"))
    req.start()
    caplog.set_level(logging.WARNING, logger="fedsilo.network.messaging")
    try:
        a.publish(topics.presence("sig-a"), Presence(sender="sig-a", node_id="sig-a", online=True), retain=True)
        deadline = time.monotonic() + WAIT
        while "sig-a" not in req.online_nodes(wait=False) and time.monotonic() < deadline:
            time.sleep(0.05)
        offline = Presence(sender="sig-a", node_id="sig-a", online=False).to_json()
        b.publish_raw(topics.presence("sig-b"), offline)  # signed by sig-b, naming sig-a
        b.publish_raw(topics.presence("sig-b"), offline, sign=False)  # unsigned
        with req.waiter(["r-sig"]) as w:
            forged = PingReply(sender="sig-a", node_id="sig-a", in_reply_to="r-sig", version="evil").to_json()
            b.publish_raw(topics.researcher("researcher", "sig-b"), forged)  # sig-b signs sig-a's reply
            tampered = sign_json(PingReply(sender="sig-b", node_id="sig-b", in_reply_to="r-sig",
                                           version="evil").to_json(), "sig-b", generate_key())  # fmt: skip
            b.publish_raw(topics.researcher("researcher", "sig-b"), tampered, sign=False)  # not sig-b's key
            barrier = PingReply(sender="sig-b", node_id="sig-b", in_reply_to="r-sig", version="barrier")
            b.publish(topics.researcher("researcher", "sig-b"), barrier)
            got = w.get(time.monotonic() + WAIT)
            assert got is not None and got.version == "barrier", got
            assert got.signer == "sig-b"
            real = PingReply(sender="sig-a", node_id="sig-a", in_reply_to="r-sig", version="real")
            a.publish(topics.researcher("researcher", "sig-a"), real)
            got = w.get(time.monotonic() + WAIT)
            assert got is not None and got.node_id == "sig-a" and got.version == "real"
        assert req.nodes()["sig-a"].online, "a presence sig-b signed made sig-a look offline"
        refused = [r.getMessage() for r in caplog.records if "refused message" in r.getMessage()]
        assert len(refused) >= 4 and any("bad signature" in m for m in refused), refused
    finally:
        a.stop()
        b.stop()
        req.close()
