"""One MQTT 5 connection (paho-mqtt 2.x): the only place paho's network thread meets asyncio.

paho runs its own network thread; its callbacks do nothing but hand their arguments to the
event loop with `call_soon_threadsafe`, so every piece of state here is touched on the loop
only. A link is one connection: it does not reconnect. Reconnecting, with backoff and jitter,
is the uplink's supervisor's job; a fresh link resumes the broker-side persistent session
(clean_start=False, session expiry) under the same client id.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edged.errors import EdgedError

__all__ = ["LinkConfig", "LinkDown", "LinkError", "MessageRefused", "MqttLink", "Settled"]

Settled = Callable[[BaseException | None], None]  # None: acknowledged; else why not


class LinkError(EdgedError):
    """The broker could not be reached or refused the connection."""


class LinkDown(LinkError):
    """The connection went away before the broker acknowledged a message."""


class MessageRefused(EdgedError):
    """The broker answered a message with a failure reason (an ACL, a size or quota limit):
    the connection is fine, the message is not accepted."""

    def __init__(self, reason: str, code: int) -> None:
        super().__init__(f"the broker refused the message: {reason} (reason code {code:#x})")
        self.code = code


@dataclass(frozen=True, slots=True)
class LinkConfig:
    """Broker address and credentials. TLS is on when `ca_file` is set (or `tls` is true with
    the system trust store); a client certificate when `cert_file` and `key_file` are."""

    host: str
    port: int = 1883
    client_id: str = ""
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    keepalive_s: int = 30
    session_expiry_s: int = 7 * 86_400
    connect_timeout_s: float = 10.0
    max_inflight: int = 64

    def __repr__(self) -> str:  # never print the password
        return f"LinkConfig(host={self.host!r}, port={self.port}, client_id={self.client_id!r})"


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


class MqttLink:
    """`await link.connect()`, then `await link.publish(...)` returns once the broker has
    acknowledged (QoS 1 PUBACK); `disconnected` is set when the connection ends."""

    def __init__(
        self,
        config: LinkConfig,
        *,
        will: tuple[str, bytes] | None = None,
        on_message: Callable[[str, bytes], None] | None = None,
    ) -> None:
        self.config = config
        self._on_message = on_message
        self._loop = asyncio.get_running_loop()
        self._pending: dict[int, Settled] = {}  # mid -> what to tell once the broker answers
        # filled by paho's thread, emptied on the loop; deque appends/pops are atomic
        self._pubacks: collections.deque[tuple[int, ReasonCode]] = collections.deque()
        self._puback_scheduled = False
        self._connected: asyncio.Future[None] = self._loop.create_future()
        self._connected.add_done_callback(_retrieve)  # a late failure nobody awaits is fine
        self.disconnected = asyncio.Event()
        self.disconnect_reason = ""
        # How many unacknowledged QoS 1 messages the broker accepts (CONNACK Receive
        # Maximum). paho neither enforces it nor lets it be set once connected, so callers
        # (the uplink's window) keep within it; strict brokers disconnect clients that don't.
        self.receive_maximum = config.max_inflight
        self.maximum_packet_size: int | None = None  # CONNACK Maximum Packet Size, if any
        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=config.client_id, protocol=paho.MQTTv5
        )
        if config.username is not None:
            client.username_pw_set(config.username, config.password)
        if config.tls or config.ca_file:
            context = ssl.create_default_context(cafile=config.ca_file)
            if config.cert_file and config.key_file:
                context.load_cert_chain(config.cert_file, config.key_file)
            client.tls_set_context(context)
        if will is not None:
            client.will_set(will[0], will[1], qos=1, retain=True)
        client.max_inflight_messages_set(config.max_inflight)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(min_delay=86_400, max_delay=86_400)  # never: see module doc
        # paho's thread -> the event loop; nothing else crosses.
        client.on_connect = lambda _c, _u, _f, rc, props: self._threadsafe(
            self._on_connect, rc, props
        )
        client.on_disconnect = lambda _c, _u, _f, rc, _p: self._threadsafe(self._on_disconnect, rc)
        client.on_publish = lambda _c, _u, mid, rc, _p: self._queue_puback(mid, rc)
        client.on_connect_fail = lambda _c, _u: self._threadsafe(self._on_connect_fail)
        if on_message is not None:
            client.on_message = lambda _c, _u, message: self._threadsafe(
                on_message, message.topic, bytes(message.payload)
            )
        self._client = client

    def _queue_puback(self, mid: int, reason: ReasonCode) -> None:
        """PUBACKs arrive in bursts: queue them and wake the loop once per burst."""
        self._pubacks.append((mid, reason))
        if not self._puback_scheduled:
            self._puback_scheduled = True
            self._threadsafe(self._drain_pubacks)

    def _drain_pubacks(self) -> None:
        self._puback_scheduled = False
        while self._pubacks:
            self._on_publish(*self._pubacks.popleft())

    def _threadsafe(self, callback: Any, *args: Any) -> None:
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(callback, *args)

    async def connect(self) -> None:
        """Connect and wait for CONNACK; LinkError if refused or not answered in time."""
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = self.config.session_expiry_s
        try:
            self._client.connect_async(
                self.config.host,
                self.config.port,
                self.config.keepalive_s,
                clean_start=False,
                properties=properties,
            )
            self._client.loop_start()
            async with asyncio.timeout(self.config.connect_timeout_s):
                await asyncio.shield(self._connected)
        except (TimeoutError, OSError, LinkError) as exc:
            await self.close()
            if isinstance(exc, LinkError):
                raise
            raise LinkError(
                f"cannot reach the broker at {self.config.host}:{self.config.port} ({exc})"
            ) from exc

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish with QoS 1 and wait for the broker's PUBACK."""
        done = self._loop.create_future()

        def settle(error: BaseException | None) -> None:
            if done.done():  # the caller stopped waiting
                return
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)

        self.publish_nowait(topic, payload, settle, retain=retain)
        await done

    def publish_nowait(
        self, topic: str, payload: bytes, on_done: Settled, *, retain: bool = False
    ) -> None:
        """Publish with QoS 1 and return; `on_done(None)` runs on the loop once the broker has
        acknowledged, `on_done(error)` (MessageRefused, LinkDown) if it will not. LinkDown at
        once when the message cannot even be handed to paho."""
        if self.disconnected.is_set():
            raise LinkDown(f"not connected ({self.disconnect_reason})")
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise LinkDown(f"publish refused locally: {paho.error_string(info.rc)}")
        # paho's PUBACK reaches _on_publish through the loop, so after this line has run
        self._pending[info.mid] = on_done

    def subscribe(self, topic: str) -> None:
        """Subscribe with QoS 1; messages go to `on_message(topic, payload)` on the loop."""
        if self._on_message is None:
            raise LinkError("this link was made without an on_message callback")
        result, _mid = self._client.subscribe(topic, qos=1)
        if result != paho.MQTT_ERR_SUCCESS:
            raise LinkDown(f"subscribe refused locally: {paho.error_string(result)}")

    async def close(self) -> None:
        """Disconnect cleanly if connected and stop paho's thread."""
        if not self.disconnected.is_set() and self._connected.done():
            self._client.disconnect()
        await asyncio.to_thread(self._client.loop_stop)
        self._on_disconnect("closed")

    # -- callbacks, on the event loop -------------------------------------------------------

    def _on_connect(self, reason: ReasonCode, properties: Properties | None) -> None:
        if self._connected.done():
            return
        broker_limit = getattr(properties, "ReceiveMaximum", None)
        if isinstance(broker_limit, int) and broker_limit > 0:
            self.receive_maximum = min(self.config.max_inflight, broker_limit)
        packet_limit = getattr(properties, "MaximumPacketSize", None)
        if isinstance(packet_limit, int) and packet_limit > 0:
            self.maximum_packet_size = packet_limit
        if reason.is_failure:
            self._connected.set_exception(LinkError(f"the broker refused the connection: {reason}"))
        else:
            self._connected.set_result(None)

    def _on_connect_fail(self) -> None:
        if self._connected.done():
            return
        where = f"cannot connect to {self.config.host}:{self.config.port}"
        if self.config.tls or self.config.ca_file:
            problem = (
                "the TCP connection or the TLS handshake failed "
                "(server certificate, client certificate or CA)"
            )
        else:
            problem = "the TCP connection failed (nothing listening, or unreachable)"
        self._connected.set_exception(LinkError(f"{where}: {problem}"))

    def _on_disconnect(self, reason: ReasonCode | str) -> None:
        self.disconnect_reason = str(reason)
        self.disconnected.set()
        if not self._connected.done():
            self._connected.set_exception(LinkError(f"disconnected while connecting: {reason}"))
        pending, self._pending = self._pending, {}
        for on_done in pending.values():
            on_done(LinkDown(f"connection lost before PUBACK ({reason})"))

    def _on_publish(self, mid: int, reason: ReasonCode) -> None:
        on_done = self._pending.pop(mid, None)
        if on_done is None:
            return
        on_done(MessageRefused(str(reason), int(reason.value)) if reason.is_failure else None)
