"""MQTT messaging over paho-mqtt 2.x: QoS 1, automatic reconnect, validated messages, presence."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedsilo.common.errors import ConfigError, ErrorCode, FedsiloError
from fedsilo.common.signing import ROLES_HEARD, SignatureError, Trust, private_from_b64, public_from_b64, sign_json

from . import topics
from .credentials import Credentials, MqttSettings
from .message_base import ATTACHED
from .messages import Message, MessageError, UntrustedMessage, parse_message
from .pki import paho_tls

log = logging.getLogger(__name__)

MessageHandler = Callable[[Message, str], None]
InvalidHandler = Callable[[MessageError, str], None]


class BrokerUnavailable(FedsiloError):
    """The broker could not be reached or refused our credentials."""


class Messaging:
    """One MQTT connection: subscribes on every (re)connect and hands validated messages on.

    Handlers run on paho's network thread: they must be quick (enqueue and return). No payload and no
    handler can stop the receive loop: every exception is caught per message, and a watchdog restarts
    paho's network thread if it dies anyway (`restarts` counts it; `connected` is False while it is dead).

    Both brokers replace the client id by the username (`use_username_as_clientid`): a party has one
    connection at a time, and a second one with the same credentials takes the first over.

        m = Messaging(creds.party, creds.mqtt, on_message=print, subscriptions=[topics.PRESENCE_ALL])
        m.start(timeout=10)
    """

    WATCHDOG_INTERVAL = 0.5
    MAX_RESTARTS = 5
    RESTART_WINDOW = 60.0
    TAKEOVER_WINDOW = 5.0
    """A connection the broker closes this soon after it was made, again and again, was taken over."""

    def __init__(
        self,
        client_id: str,
        settings: MqttSettings,
        on_message: MessageHandler,
        subscriptions: Sequence[str] = (),
        on_invalid: InvalidHandler | None = None,
        will: tuple[str, Message] | None = None,
        on_connected: Callable[[], None] | None = None,
        persistent: bool = True,
        signer: tuple[str, Ed25519PrivateKey] | None = None,
        trust: Trust | None = None,
    ) -> None:
        """`persistent`: keep the broker session across reconnects (daemons with a fixed client id);
        researchers use a fresh id per experiment and a clean session. `signer` (party, key) signs every
        message published; with `trust`, only messages it verifies are parsed (see `Messaging.of`)."""
        self.client_id = client_id
        self._signer = signer
        self._trust = trust
        self._held: list[tuple[bytes, str]] = []
        self._held_lock = threading.Lock()  # paho's thread holds, the watchdog's may release
        self._hold_until = 0.0
        if trust is not None:  # first: its retained roster then arrives before what the other filters bring
            subscriptions = [topics.ROSTER, *[t for t in subscriptions if t != topics.ROSTER]]
        self.settings = settings
        self._on_message = on_message
        self._on_invalid = on_invalid
        self._on_connected = on_connected
        self._subscriptions = list(subscriptions)
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._connected_at = 0.0
        self._quick_drops = 0
        self.restarts = 0
        self.failed = False
        self._first_result: str | None = None
        self._first_done = threading.Event()
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=not persistent,  # fixed id + persistent session keeps QoS 1 messages queued
            protocol=mqtt.MQTTv311,
        )
        self._client.username_pw_set(settings.username, settings.password)
        paho_tls(self._client, settings)  # the consortium CA only; the party's certificate for mutual TLS
        if will is not None:
            topic, msg = will
            self._client.will_set(topic, self._signed(msg.to_json()), qos=1, retain=True)
        self._client.max_inflight_messages_set(100)
        self._client.max_queued_messages_set(0)
        self._client.reconnect_delay_set(min_delay=1, max_delay=8)
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_subscribe = self._handle_subscribe
        self._sub_mid: int | None = None
        self._pending_ready = False
        self._client.on_message = self._handle_message
        self._client.on_socket_open = _no_delay

    @classmethod
    def of(
        cls,
        creds: Credentials,
        on_message: MessageHandler,
        subscriptions: Sequence[str] = (),
        roster_store: Path | None = None,
        **options: Any,
    ) -> Messaging:
        """The connection of the party `creds` names: its messages signed with its key, and only messages
        signed by a party of the roles it hears (`ROLES_HEARD`) taken, after the authority's roster.
        `roster_store` keeps the newest roster across restarts.

            m = Messaging.of(creds, on_message=print, subscriptions=[topics.node_inbox(creds.party)])
        """
        if not creds.signing_key or not creds.authority_key:
            raise ConfigError(f"the credentials of '{creds.party}' have no signing key (made before messages "
                              "were signed): restart the network, which adds keys; use the new file")  # fmt: skip
        trust = Trust(public_from_b64(creds.authority_key), creds.roster, ROLES_HEARD[creds.role], store=roster_store)
        signer = (creds.party, private_from_b64(creds.signing_key))
        return cls(creds.party, creds.mqtt, on_message, subscriptions, signer=signer, trust=trust, **options)

    def _signed(self, payload: bytes) -> bytes:
        """`payload` (a message's wire form) with its JSON signed; attached blob bytes follow as they were."""
        if self._signer is None:
            return payload
        head, sep, attached = payload.partition(ATTACHED)
        return sign_json(head, self._signer[0], self._signer[1]) + sep + attached

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float) -> None:
        """Connect (raising `BrokerUnavailable` on refusal or timeout) and keep reconnecting after."""
        s = self.settings
        try:
            self._client.connect_async(s.host, s.port, keepalive=s.keepalive)
        except (OSError, ValueError) as exc:
            raise BrokerUnavailable(f"cannot reach the broker at {s.host}:{s.port}: {exc}") from exc
        self._stopping.clear()
        self._client.loop_start()
        self._watchdog = threading.Thread(target=self._watch, name=f"fedsilo-watchdog-{self.client_id}", daemon=True)
        self._watchdog.start()
        if not self._first_done.wait(timeout):
            self.stop()
            raise BrokerUnavailable(
                f"no answer from the broker at {s.host}:{s.port} within {timeout:.0f}s; is the network started? "
                + (  # a failed TLS handshake looks like silence from here: say what to check
                    "(TLS: the broker's certificate must come from the CA in these credentials)"
                    if s.tls is not None
                    else "(plain TCP: a network with TLS on refuses it; use the party's startup kit)"
                )
            )
        if self._first_result:
            self.stop()
            raise BrokerUnavailable(f"broker at {s.host}:{s.port} refused '{s.username}': {self._first_result}")

    def stop(self, farewell: tuple[str, Message] | None = None) -> None:
        """Disconnect cleanly; `farewell` is published (retained) first, e.g. an offline presence."""
        self._stopping.set()
        if farewell is not None and self._connected.is_set():
            topic, msg = farewell
            info = self._client.publish(topic, self._signed(msg.to_json()), qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=2)
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()

    @property
    def connected(self) -> bool:
        """Connected, and paho's network thread alive to read what arrives."""
        return self._connected.is_set() and self.receiving

    @property
    def receiving(self) -> bool:
        return self._client._thread is not None  # paho clears it when its loop ends, however it ends

    def _watch(self) -> None:
        """Restart paho's network thread whenever it died (it cannot, short of a BaseException in a handler).

        The dead thread may have stopped half-way through a packet, so the connection is made anew (the
        broker re-delivers what was not acknowledged). A thread that keeps dying (a message that kills it
        each time it is re-delivered) is given up on: `failed` is set, and a daemon exits non-zero."""
        recent: list[float] = []
        while not self._stopping.wait(self.WATCHDOG_INTERVAL):
            self._release_held()
            if self._client._thread is not None or self._stopping.is_set():
                continue
            now = time.monotonic()
            recent = [t for t in recent if now - t < self.RESTART_WINDOW] + [now]
            if len(recent) > self.MAX_RESTARTS:
                self.failed = True
                log.critical("the MQTT network thread of %s died %d times within %gs; giving up",
                             self.client_id, len(recent), self.RESTART_WINDOW)  # fmt: skip
                return
            self.restarts += 1
            log.error("the MQTT network thread of %s died; reconnecting (restart %d)", self.client_id, self.restarts)
            self._connected.clear()
            with contextlib.suppress(OSError, ValueError):  # the broker may be away: the loop retries
                self._client.reconnect()
            self._client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    # ------------------------------------------------------------------ traffic
    def subscribe(self, topic: str) -> None:
        if topic not in self._subscriptions:
            self._subscriptions.append(topic)
        if self._connected.is_set():
            self._client.subscribe(topic, qos=1)

    def publish(self, topic: str, message: Message, retain: bool = False) -> mqtt.MQTTMessageInfo:
        """Queue a QoS 1 publish, signed; paho re-sends it after a reconnect if it was not acknowledged."""
        return self._client.publish(topic, self._signed(message.to_wire()), qos=1, retain=retain)

    def publish_raw(
        self, topic: str, payload: bytes, retain: bool = False, sign: bool = True
    ) -> mqtt.MQTTMessageInfo:
        """Publish a JSON object's bytes (signed, when this connection has a signer), or with `sign=False`
        bytes as they are (tests use it to send malformed or unsigned input)."""
        return self._client.publish(topic, self._signed(payload) if sign else payload, qos=1, retain=retain)

    # ------------------------------------------------------------------ paho callbacks
    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            if not self._first_done.is_set():
                self._first_result = str(reason_code)
                self._first_done.set()
            log.warning("broker refused connection: %s", reason_code)
            return
        self._connected_at = time.monotonic()
        if self._trust is not None:
            self._hold_until = self._connected_at + self.ROSTER_WAIT_S
        self._pending_ready = True
        if self._subscriptions:
            self._sub_mid = client.subscribe([(topic, 1) for topic in self._subscriptions])[1]
        # With a session the broker kept, its filters are live already; otherwise `connected` (a daemon's
        # `broker_connected`) waits for the SUBACK: a node daemon that said it was connected on its first
        # connection once missed a request sent right after (test_signatures, machine under load).
        if not self._subscriptions or getattr(flags, "session_present", False):
            self._ready()

    def _handle_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        if mid == self._sub_mid:
            self._ready()

    def _ready(self) -> None:
        if not self._pending_ready:  # once per connection
            return
        self._pending_ready = False
        self._connected.set()
        self._first_done.set()
        log.debug("connected to broker as %s", self.client_id)
        if self._on_connected is not None:
            try:
                self._on_connected()
            except Exception:  # a failing hook must not kill paho's thread
                log.exception("on_connected hook failed")

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        if not reason_code.is_failure:
            return
        if self._connected_at and time.monotonic() - self._connected_at < self.TAKEOVER_WINDOW:
            self._quick_drops += 1
        else:
            self._quick_drops = 0
        if self._quick_drops >= 3:
            log.error("the broker keeps closing %s's connection right after it is made: another process is "
                      "probably connected with the same credentials (a party connects once); reconnecting",
                      self.settings.username)  # fmt: skip
        else:
            log.warning("lost the broker (%s); reconnecting", reason_code)

    def _handle_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        if self._trust is not None and msg.topic == topics.ROSTER:
            self._take_roster(msg.payload)
        else:
            self._deliver(bytes(msg.payload), msg.topic, may_hold=True)

    def _deliver(self, payload: bytes, topic: str, may_hold: bool) -> None:
        """The one receive path of every party: signature, bounded parse, then the handler; nothing escapes."""
        try:
            try:
                message = self._open(payload, topic, may_hold)
            except MessageError as exc:
                log.warning("%s message on %s: %s", "refused" if isinstance(exc, UntrustedMessage) else "invalid",
                            topic, exc.reason)  # fmt: skip
                if self._on_invalid is not None:
                    self._on_invalid(exc, topic)
                return
            if message is not None:
                self._on_message(message, topic)
        except Exception:  # a handler bug or a payload we did not foresee: log it, keep receiving
            log.exception("message on %s could not be handled", topic)

    def _open(self, payload: bytes, topic: str, may_hold: bool) -> Message | None:
        """Verify, then parse only the signed bytes; None when held until the roster arrives."""
        if self._trust is None:
            return parse_message(payload)
        head, sep, attached = payload.partition(ATTACHED)  # the signature is on the JSON (`_signed`)
        try:
            opened = self._trust.open(head)
            publisher = topics.publisher(topic)
            if opened.signer != publisher:
                raise SignatureError(ErrorCode.SENDER_MISMATCH, f"signed by {opened.signer!r} but published by "
                                     f"{publisher or 'no party'!r} on {topic}", opened.signer)  # fmt: skip
        except SignatureError as exc:
            if exc.code == ErrorCode.UNKNOWN_SIGNER and may_hold and self._hold(payload, topic):
                return None
            raise UntrustedMessage(exc.reason, exc.code, exc.signer, payload) from None
        message = parse_message(opened.body + sep + attached if sep else opened.body)
        if message.sender != opened.signer:
            raise UntrustedMessage(f"signed by {opened.signer!r} but says it comes from {message.sender!r}",
                                   ErrorCode.SENDER_MISMATCH, opened.signer, opened.body)  # fmt: skip
        message._signature = (opened.signer, opened.signature)
        return message

    # ------------------------------------------------------------------ the roster
    ROSTER_WAIT_S = 5.0
    """After a (re)connection, a message from a signer the roster does not name is held until the retained
    roster arrived (or this long): a persistent session delivers what it queued before any subscription's
    retained message, and a presence may beat the roster on a broker that answers subscriptions in parallel."""
    MAX_HELD = 64

    def _hold(self, payload: bytes, topic: str) -> bool:
        with self._held_lock:
            if time.monotonic() >= self._hold_until or len(self._held) >= self.MAX_HELD:
                return False
            self._held.append((payload, topic))
            return True

    def _take_roster(self, payload: bytes) -> None:
        assert self._trust is not None
        try:
            self._trust.offer_roster(payload)
        except SignatureError as exc:
            log.warning("roster on %s ignored: %s", topics.ROSTER, exc.reason)
            return
        self._hold_until = 0.0
        self._release_held()

    def _release_held(self) -> None:
        """Deliver what waited for the roster, once it came or the wait is over (paho's or the watchdog's thread)."""
        with self._held_lock:
            if not self._held or time.monotonic() < self._hold_until:
                return
            held, self._held = self._held, []
        for payload, topic in held:
            self._deliver(payload, topic, may_hold=False)


def _no_delay(client: mqtt.Client, userdata: object, sock: object) -> None:
    """Send every MQTT packet at once (paho leaves Nagle's algorithm on).

    With Nagle, a publish that follows a small unacknowledged write (typically the PUBACK of the
    message just received) waits for the broker's delayed TCP ACK: up to 40 ms a message on Linux,
    paid twice per round (request to the node, its acknowledgement back)."""
    with contextlib.suppress(AttributeError, OSError):  # websocket wrappers have no setsockopt
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[attr-defined]
