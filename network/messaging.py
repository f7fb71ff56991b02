"""MQTT messaging over paho-mqtt 2.x: QoS 1, automatic reconnect, validated messages, presence."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence

import paho.mqtt.client as mqtt

from fedsilo.common.errors import FedsiloError

from .credentials import MqttSettings
from .messages import Message, MessageError, parse_message
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
    ) -> None:
        """`persistent`: keep the broker session across reconnects (daemons with a fixed client id);
        researchers use a fresh id per experiment and a clean session."""
        self.client_id = client_id
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
            self._client.will_set(topic, msg.to_json(), qos=1, retain=True)
        self._client.max_inflight_messages_set(100)
        self._client.max_queued_messages_set(0)
        self._client.reconnect_delay_set(min_delay=1, max_delay=8)
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_message = self._handle_message
        self._client.on_socket_open = _no_delay

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
                f"no answer from the broker at {s.host}:{s.port} within {timeout:.0f}s; is the network started?"
            )
        if self._first_result:
            self.stop()
            raise BrokerUnavailable(f"broker at {s.host}:{s.port} refused '{s.username}': {self._first_result}")

    def stop(self, farewell: tuple[str, Message] | None = None) -> None:
        """Disconnect cleanly; `farewell` is published (retained) first, e.g. an offline presence."""
        self._stopping.set()
        if farewell is not None and self._connected.is_set():
            topic, msg = farewell
            info = self._client.publish(topic, msg.to_json(), qos=1, retain=True)
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
        """Queue a QoS 1 publish; paho re-sends it after a reconnect if it was not acknowledged."""
        return self._client.publish(topic, message.to_json(), qos=1, retain=retain)

    def publish_raw(self, topic: str, payload: bytes) -> mqtt.MQTTMessageInfo:
        """Publish bytes as they are (tests use it to send malformed input)."""
        return self._client.publish(topic, payload, qos=1)

    # ------------------------------------------------------------------ paho callbacks
    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            if not self._first_done.is_set():
                self._first_result = str(reason_code)
                self._first_done.set()
            log.warning("broker refused connection: %s", reason_code)
            return
        for topic in self._subscriptions:
            client.subscribe(topic, qos=1)
        self._connected_at = time.monotonic()
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
        """The one receive path of every party: bounded parse, then the handler; nothing escapes."""
        try:
            try:
                message = parse_message(msg.payload)
            except MessageError as exc:
                log.warning("invalid message on %s: %s", msg.topic, exc.reason)
                if self._on_invalid is not None:
                    self._on_invalid(exc, msg.topic)
                return
            self._on_message(message, msg.topic)
        except Exception:  # a handler bug or a payload we did not foresee: log it, keep receiving
            log.exception("message on %s could not be handled", msg.topic)


def _no_delay(client: mqtt.Client, userdata: object, sock: object) -> None:
    """Send every MQTT packet at once (paho leaves Nagle's algorithm on).

    With Nagle, a publish that follows a small unacknowledged write (typically the PUBACK of the
    message just received) waits for the broker's delayed TCP ACK: up to 40 ms a message on Linux,
    paid twice per round (request to the node, its acknowledgement back)."""
    with contextlib.suppress(AttributeError, OSError):  # websocket wrappers have no setsockopt
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[attr-defined]
