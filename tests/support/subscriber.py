"""The receiving side of a test: a real paho-mqtt 2.x (MQTT 5) subscriber collecting messages.

    with MqttSubscriber(broker.host, broker.port, "edged/v1/+/telemetry") as sub:
        ...publish...
        sub.wait_for(lambda msgs: len(msgs) >= 10)   # or sub.wait_count(10)
        topic, payload = sub.messages[0]

It subscribes with QoS 1 on every (re)connect and only returns from `start()` once the broker
acknowledged the subscription, so nothing published afterwards is missed. After a broker
restart it reconnects within about 0.1 s and subscribes again (`wait_subscribed()`).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from types import TracebackType
from typing import Any, NamedTuple

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

__all__ = ["MqttSubscriber", "Received"]


class Received(NamedTuple):
    topic: str
    payload: bytes


class MqttSubscriber:
    """Subscribes `topic_filter` with QoS 1 and keeps every message received, in order."""

    def __init__(
        self,
        host: str,
        port: int,
        topic_filter: str = "#",
        *,
        client_id: str | None = None,
        clean_start: bool = True,
        session_expiry: int = 0,
        timeout: float = 5.0,
    ) -> None:
        """`clean_start=False` with a `session_expiry` (seconds) keeps the broker queueing
        QoS 1 messages for this client while it is disconnected."""
        self.host, self.port, self.topic_filter = host, port, topic_filter
        self.timeout = timeout
        self.client_id = client_id or f"test-sub-{uuid.uuid4().hex[:8]}"
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._messages: list[Received] = []
        self._subscribed = threading.Event()
        self.connects = 0
        self.disconnects = 0
        self._clean_start = clean_start
        self._session_expiry = session_expiry
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5
        )
        client.reconnect_delay_set(min_delay=0.1, max_delay=1)  # type: ignore[arg-type]
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_disconnect = self._on_disconnect
        self.client = client

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> MqttSubscriber:
        """Connect, subscribe, and wait for the SUBACK."""
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = self._session_expiry
        self.client.connect(
            self.host, self.port, keepalive=30, clean_start=self._clean_start,
            properties=properties,
        )  # fmt: skip
        self.client.loop_start()
        try:
            self.wait_subscribed()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Disconnect and end paho's network thread."""
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> MqttSubscriber:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def wait_subscribed(self, timeout: float | None = None) -> None:
        """Block until the current connection's subscription is acknowledged."""
        if not self._subscribed.wait(self.timeout if timeout is None else timeout):
            raise TimeoutError(f"no SUBACK for {self.topic_filter!r} from {self.host}:{self.port}")

    # -- paho callbacks (network thread) -----------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:  # fmt: skip
        if reason.is_failure:
            return
        self.connects += 1
        client.subscribe(self.topic_filter, qos=1)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any,
                      properties: Any) -> None:  # fmt: skip
        if all(not r.is_failure for r in reasons):
            self._subscribed.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:  # fmt: skip
        self.disconnects += 1
        self._subscribed.clear()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._changed:
            self._messages.append(Received(message.topic, bytes(message.payload)))
            self._changed.notify_all()

    # -- what arrived ------------------------------------------------------------------------

    @property
    def messages(self) -> list[Received]:
        """A snapshot of every message received so far, in arrival order."""
        with self._lock:
            return list(self._messages)

    def payloads(self) -> list[bytes]:
        return [m.payload for m in self.messages]

    def clear(self) -> None:
        with self._lock:
            self._messages.clear()

    def wait_for(
        self, predicate: Callable[[list[Received]], bool], timeout: float | None = None
    ) -> list[Received]:
        """Block until predicate(messages so far) holds; return a snapshot of them.

        The predicate runs under the lock on the live list: read it, do not keep it.
        Raises TimeoutError naming how many messages did arrive."""
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        with self._changed:
            while not predicate(self._messages):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"condition not met within {limit} s; "
                        f"{len(self._messages)} message(s) received on {self.topic_filter!r}"
                    )
                self._changed.wait(left)
            return list(self._messages)

    def wait_count(self, count: int, timeout: float | None = None) -> list[Received]:
        """Block until at least `count` messages arrived."""
        return self.wait_for(lambda msgs: len(msgs) >= count, timeout)
