"""The device's own MQTT broker, where cameras and sensors already publish: MQTT sources read
from it and every result is published back on it, whatever the state of the uplink.

One paho connection with a persistent session. Input topics are read with QoS 1 and manual
acknowledgement: a message is acknowledged only once its samples are settled, so a stop or a
crash means redelivery, not loss. Backpressure: when a source's queue is full, paho's network
thread waits for room before it reads on, so TCP flow control leaves the messages with the
broker (within its max_queued_messages). The session also asks for a Receive Maximum, but
Mosquitto 2.0.11 releases a whole window per PUBACK, so that alone does not bound anything.
paho's thread does nothing else with a message than hand it to the event loop; its own
reconnect covers a local broker restart (the subscription lives in the session).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edged.config import LocalMqttConfig, MqttSourceConfig
from edged.sources import BadPayload, Sample, SettleAll, Submit, decode_payload

__all__ = ["LocalBus", "MqttSource"]

log = logging.getLogger(__name__)
SESSION_EXPIRY_S = 86_400


@dataclass(frozen=True, slots=True)
class _Message:
    topic: str
    payload: bytes
    mid: int
    qos: int


class MqttSource:
    """Samples from one topic filter; fed by the bus, drained by `run`."""

    def __init__(
        self,
        config: MqttSourceConfig,
        sample_shape: tuple[int, ...],
        dtype: str,
        reject: Callable[[str, str, str], None],
        queue_size: int,
    ) -> None:
        self.name = config.name
        self.config = config
        self._shape, self._dtype, self._reject = sample_shape, dtype, reject
        self._queue: asyncio.Queue[_Message] = asyncio.Queue(queue_size)
        self._ack: Callable[[int, int], None] = lambda _mid, _qos: None

    async def offer(self, message: _Message) -> None:
        """From the bus, on the loop: waits while the queue is full."""
        await self._queue.put(message)

    async def run(self, submit: Submit) -> None:
        while True:
            message = await self._queue.get()
            what = f"message on {message.topic}"
            if len(message.payload) > self.config.max_bytes:
                self._reject(self.name, "too_large", f"{what} is {len(message.payload)} bytes")
                self._ack(message.mid, message.qos)
                continue
            try:
                batch = decode_payload(
                    message.payload, self.config.format, self._shape, self._dtype, what
                )
            except BadPayload as exc:
                self._reject(self.name, exc.kind, str(exc))
                self._ack(message.mid, message.qos)
                continue
            outcome = SettleAll(len(batch), functools.partial(self._settled, message))
            for sample in batch:
                await submit(Sample(self.name, message.topic, sample, outcome.settle))

    def _settled(self, message: _Message, _any_refused: bool) -> None:
        self._ack(message.mid, message.qos)


Handler = Callable[[bytes], Awaitable[None]]


class LocalBus:
    """`await bus.start()`; `publish_result(payload)`; `await bus.close()`. `handlers` are
    other topics the daemon reads (QoS 1, acknowledged once the handler returned), such as the
    fine-tuning truth topic."""

    def __init__(
        self,
        config: LocalMqttConfig,
        client_id: str,
        sources: list[MqttSource],
        window: int,
        handlers: Mapping[str, Handler] | None = None,
    ) -> None:
        self.config = config
        self._sources = sources
        self._handlers = dict(handlers or {})
        self._loop = asyncio.get_running_loop()
        self.connected = asyncio.Event()
        self._closing = threading.Event()
        self.published = 0
        self.unpublished = 0
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5,
            manual_ack=True,
        )
        if config.username is not None:
            password = None
            if config.password_file is not None:
                password = config.password_file.read_text(encoding="utf-8").strip()
            client.username_pw_set(config.username, password)
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._client = client
        self._window = window
        for source in sources:
            source._ack = self._acknowledge

    async def start(self, timeout_s: float = 5.0) -> None:
        """Connect in the background; wait up to `timeout_s` for the first CONNACK (the bus
        keeps trying after that, so a local broker that starts later is picked up)."""
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = SESSION_EXPIRY_S
        properties.ReceiveMaximum = self._window
        self._client.connect_async(
            self.config.host, self.config.port, 30, clean_start=False, properties=properties
        )
        self._client.loop_start()
        try:
            async with asyncio.timeout(timeout_s):
                await self.connected.wait()
        except TimeoutError:
            log.warning(
                "local broker %s:%d not reachable yet; retrying in the background",
                self.config.host,
                self.config.port,
            )

    def publish_result(self, payload: bytes) -> None:
        """QoS 0, never waits: results are for local consumers that are listening now."""
        info = self._client.publish(self.config.results_topic, payload, qos=0)
        if info.rc == paho.MQTT_ERR_SUCCESS:
            self.published += 1
        else:
            self.unpublished += 1

    async def close(self) -> None:
        self._closing.set()
        self._client.disconnect()
        await asyncio.to_thread(self._client.loop_stop)

    # -- paho's thread ----------------------------------------------------------------------

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.warning("local broker refused the connection: %s", reason)
            return
        for source in self._sources:
            client.subscribe(source.config.topic, qos=source.config.qos)
        for topic in self._handlers:
            client.subscribe(topic, qos=1)
        self._loop.call_soon_threadsafe(self.connected.set)

    def _on_disconnect(self, *_args: Any) -> None:
        self._loop.call_soon_threadsafe(self.connected.clear)

    def _on_message(self, _c: paho.Client, _u: Any, message: paho.MQTTMessage) -> None:
        """Blocks paho's thread until the message is queued: the backpressure."""
        item = _Message(message.topic, bytes(message.payload), message.mid, message.qos)
        if self._closing.is_set():
            return  # unacknowledged: the broker delivers it again next time
        queued = asyncio.run_coroutine_threadsafe(self._route(item), self._loop)
        while not self._closing.is_set():
            try:
                queued.result(timeout=0.25)
                return
            except concurrent.futures.TimeoutError:
                continue
        queued.cancel()

    # -- the loop ---------------------------------------------------------------------------

    async def _route(self, message: _Message) -> None:
        for source in self._sources:
            if paho.topic_matches_sub(source.config.topic, message.topic):
                await source.offer(message)
                return
        for topic, handler in self._handlers.items():
            if paho.topic_matches_sub(topic, message.topic):
                try:
                    await handler(message.payload)
                except Exception:  # a handler's bug must not stop the bus
                    log.exception("handler for %s failed", topic)
                break
        self._acknowledge(message.mid, message.qos)

    def _acknowledge(self, mid: int, qos: int) -> None:
        if qos > 0:
            self._client.ack(mid, qos)
