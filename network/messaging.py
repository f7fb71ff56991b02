"""MQTT messaging over paho-mqtt 2.x: QoS 1, automatic reconnect, validated messages, presence."""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Sequence

import paho.mqtt.client as mqtt

from fedsilo.common.errors import FedsiloError

from .credentials import MqttSettings
from .messages import Message, MessageError, parse_message

log = logging.getLogger(__name__)

MessageHandler = Callable[[Message, str], None]
InvalidHandler = Callable[[MessageError, str], None]


class BrokerUnavailable(FedsiloError):
    """The broker could not be reached or refused our credentials."""


class Messaging:
    """One MQTT connection: subscribes on every (re)connect and hands validated messages on.

    Handlers run on paho's network thread: they must be quick (enqueue and return).
    """

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
        self._first_result: str | None = None
        self._first_done = threading.Event()
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=not persistent,  # fixed id + persistent session keeps QoS 1 messages queued
            protocol=mqtt.MQTTv311,
        )
        self._client.username_pw_set(settings.username, settings.password)
        if settings.tls_ca:
            self._client.tls_set(ca_certs=settings.tls_ca, cert_reqs=ssl.CERT_REQUIRED)
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
        self._client.loop_start()
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
        return self._connected.is_set()

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
        if reason_code.is_failure:
            log.warning("lost the broker (%s); reconnecting", reason_code)

    def _handle_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        try:
            message = parse_message(msg.payload)
        except MessageError as exc:
            log.warning("invalid message on %s: %s", msg.topic, exc.reason)
            if self._on_invalid is not None:
                self._call(self._on_invalid, exc, msg.topic)
            return
        self._call(self._on_message, message, msg.topic)

    @staticmethod
    def _call(handler: Callable, *args) -> None:
        try:
            handler(*args)
        except Exception:  # never let a handler bug take the network thread down
            log.exception("message handler failed")


def _no_delay(client: mqtt.Client, userdata: object, sock: object) -> None:
    """Send every MQTT packet at once (paho leaves Nagle's algorithm on).

    With Nagle, a publish that follows a small unacknowledged write (typically the PUBACK of the
    message just received) waits for the broker's delayed TCP ACK: up to 40 ms a message on Linux,
    paid twice per round (request to the node, its acknowledgement back)."""
    with contextlib.suppress(AttributeError, OSError):  # websocket wrappers have no setsockopt
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[attr-defined]
