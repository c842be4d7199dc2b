"""The uplink: drains the outbox to the broker, and keeps a connection to drain through.

A supervisor loop owns the connection: it connects, drains until the link drops, hands every
unacknowledged record back to the outbox, and reconnects after an exponential backoff with
full jitter (tenacity's `wait_random_exponential`), so a fleet reconnecting after a broker
restart spreads out instead of stampeding. Draining takes leased records in priority order,
packs them per channel into signed CBOR messages up to `max_message_bytes`, keeps up to
`window` messages in flight, respects the bandwidth budget, and acknowledges records to the
outbox only when the broker's PUBACK for their message arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nacl.signing import SigningKey
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    wait_random_exponential,
)

from edged.budget import Budget, BudgetConfig
from edged.mqtt_link import LinkConfig, LinkError, MessageRefused, MqttLink
from edged.outbox import Outbox
from edged_formats.wire import (
    TOPIC_ROOT,
    Record,
    encode_batch_raw,
    encode_record,
    message_size,
    topic_for,
)

__all__ = ["Uplink", "UplinkConfig", "UplinkStats", "backoff_wait"]

log = logging.getLogger(__name__)


def backoff_wait(initial_s: float, max_s: float) -> wait_random_exponential:
    """Full jitter: attempt n waits uniformly between 0 and min(max_s, initial_s * 2**(n-1))."""
    return wait_random_exponential(multiplier=initial_s, max=max_s)


def _ack_done(done: asyncio.Future[None]) -> None:
    if not done.cancelled() and done.exception() is not None:
        log.warning("uplink: acknowledged records will be sent again: %s", done.exception())


class _HealthySessionEnded(Exception):
    """A connection that lasted long enough ended: reconnect with a fresh backoff."""


@dataclass(frozen=True, slots=True)
class UplinkConfig:
    device_id: str
    link: LinkConfig
    max_message_bytes: int = 64 * 1024
    window: int = 32
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 120.0
    refusal_hold_s: float = 5.0  # a channel the broker refuses waits, doubling to 10 min
    healthy_after_s: float = 30.0  # a connection that lasted this long resets the backoff

    def __post_init__(self) -> None:
        if not 1024 <= self.max_message_bytes <= 16 * 1024 * 1024:
            raise ValueError("max_message_bytes must be between 1 KiB and 16 MiB")
        if not 1 <= self.window <= 1024:
            raise ValueError("window must be between 1 and 1024")


@dataclass(slots=True)
class UplinkStats:
    state: str = "starting"
    connects: int = 0
    connect_failures: int = 0
    messages: int = 0
    records: int = 0
    bytes: int = 0
    window: int = 0  # messages in flight allowed on the current connection
    refused_messages: int = 0
    held_channels: dict[str, float] = field(default_factory=dict)  # channel -> hold, s
    last_error: str = ""


@dataclass(slots=True)
class _Flight:
    """One connection's messages between publish and the broker's answer."""

    count: int = 0
    acked: list[int] = field(default_factory=list)  # PUBACKed, not yet handed to the outbox
    hand_over_due: bool = False  # a hand-over is scheduled on the loop
    progress: asyncio.Event = field(default_factory=asyncio.Event)  # an answer came


@dataclass(slots=True)
class _Message:
    channel: str
    seqs: list[int] = field(default_factory=list)
    encoded: list[bytes] = field(default_factory=list)
    record_bytes: int = 0


class Uplink:
    """`await uplink.run()` until cancelled; `stats` says how it is doing."""

    def __init__(
        self,
        config: UplinkConfig,
        outbox: Outbox,
        signing_key: SigningKey,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        on_command: Callable[[str, bytes], None] | None = None,
    ) -> None:
        self.config = config
        self._on_command = on_command  # (command name, payload) from edged/v1/<id>/cmd/<name>
        self.outbox = outbox
        self._key = signing_key
        self._monotonic = monotonic
        self._channel_of = {c.name: c.channel for c in outbox.config.classes}
        self._budget = Budget(
            config.budget, monotonic=monotonic, wall=wall, max_message=config.max_message_bytes
        )
        self._wait = backoff_wait(config.backoff_initial_s, config.backoff_max_s)
        self._random = random.Random()  # the jitter after a healthy connection ended
        self.stats = UplinkStats()
        self.connected = asyncio.Event()
        # Envelope bytes around the records: an upper bound for any message up to the limit
        # (count heads at their widest), so packing never computes exact sizes per record.
        self._overhead = {
            channel: message_size(config.device_id, channel, 65_535, config.max_message_bytes)
            - config.max_message_bytes
            for channel in set(self._channel_of.values())
        }
        self._topic = {channel: topic_for(config.device_id, channel) for channel in self._overhead}
        self._kinds_of = {
            channel: {kind for kind, ch in self._channel_of.items() if ch == channel}
            for channel in self._overhead
        }
        self._held_until: dict[str, float] = {}  # channel -> monotonic time it may send again
        self._hold_s: dict[str, float] = {}
        self._message_limit = config.max_message_bytes
        self._event_tasks: set[asyncio.Task[Any]] = set()  # refusal events being kept

    # -- supervisor -------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, drain, and after every loss reconnect with jittered exponential backoff;
        a connection that stayed up `healthy_after_s` starts the backoff afresh, after a
        first jittered wait: a broker that drops its whole fleet at once (a restart, a
        failover, a NAT timeout) is not met by every device at the same instant."""
        if self.config.budget.bytes_per_day is not None:  # today's spending survives restarts
            day = await self.outbox.recall("budget_day", -1)
            self._budget.restore(int(day), int(await self.outbox.recall("budget_spent", 0)))
        while True:
            retrying = AsyncRetrying(
                wait=self._wait,
                retry=retry_if_exception_type(LinkError),
                before_sleep=self._on_backoff,
            )
            try:
                async for attempt in retrying:
                    with attempt:
                        await self._supervised_session()
            except _HealthySessionEnded:
                delay = self._random.uniform(0.0, self.config.backoff_initial_s)
                self.stats.state = f"backoff {delay:.1f}s"
                await asyncio.sleep(delay)

    async def _supervised_session(self) -> None:
        started = self._monotonic()
        try:
            await self._session()
        except LinkError as exc:
            self.stats.last_error = str(exc)
            if not self.connected.is_set():
                self.stats.connect_failures += 1
            log.warning("uplink: %s", exc)
            if self._monotonic() - started >= self.config.healthy_after_s:
                raise _HealthySessionEnded from exc
            raise
        finally:
            self.connected.clear()
            self.outbox.release()

    @property
    def _command_prefix(self) -> str:
        return f"{TOPIC_ROOT}/{self.config.device_id}/cmd/"

    def _command(self, topic: str, payload: bytes) -> None:
        if self._on_command is not None and topic.startswith(self._command_prefix):
            self._on_command(topic.removeprefix(self._command_prefix), payload)

    def _on_backoff(self, retry_state: RetryCallState) -> None:
        delay = retry_state.next_action.sleep if retry_state.next_action else 0.0
        self.stats.state = f"backoff {delay:.1f}s"

    def _state_message(self, online: bool) -> tuple[str, bytes]:
        record = Record("state", self.outbox.boot, 0, time.time(), {"online": online})
        data = encode_batch_raw(self.config.device_id, "state", [encode_record(record)], self._key)
        return topic_for(self.config.device_id, "state"), data

    async def _session(self) -> None:
        self.stats.state = "connecting"
        link = MqttLink(
            self.config.link,
            will=self._state_message(online=False),
            on_message=self._command if self._on_command else None,
        )
        try:
            await link.connect()
            self.stats.connects += 1
            if self._on_command is not None:
                link.subscribe(f"{self._command_prefix}#")
            topic, data = self._state_message(online=True)
            try:
                await link.publish(topic, data, retain=True)
            except MessageRefused as refusal:  # presence is best effort; records are not
                self.stats.last_error = f"state: {refusal}"
                log.warning("uplink: presence refused: %s", refusal)
            self.stats.state = "connected"
            self.connected.set()
            await self._drain(link)
        finally:
            if self.connected.is_set() and not link.disconnected.is_set():
                # A clean DISCONNECT discards the will: say "offline" ourselves.
                with contextlib.suppress(LinkError, MessageRefused, TimeoutError):
                    topic, data = self._state_message(online=False)
                    async with asyncio.timeout(2.0):
                        await link.publish(topic, data, retain=True)
            await link.close()

    # -- draining ---------------------------------------------------------------------------

    async def _drain(self, link: MqttLink) -> None:
        flight = _Flight()
        down = asyncio.create_task(link.disconnected.wait())
        ready: asyncio.Task[None] | None = None
        window = self.stats.window = min(self.config.window, link.receive_maximum)
        self._message_limit = self.config.max_message_bytes
        if link.maximum_packet_size:  # leave room for the fixed header and the topic
            self._message_limit = min(self._message_limit, link.maximum_packet_size - 256)
        try:
            while not link.disconnected.is_set():
                flight.progress.clear()
                room = window - flight.count
                # refill in batches: one lease per half window, not one per freed slot
                refill = room > 0 and (not flight.count or room >= max(1, window // 2))
                messages = await self._next_messages(room) if refill else []
                signed = await asyncio.to_thread(self._sign_all, messages) if messages else []
                for message, data in zip(messages, signed, strict=True):
                    await self._spend(message, link)
                    self._send(link, message, data, flight)
                if messages and flight.count < window // 2:
                    continue
                if not flight.count and (ready is None or ready.done()):
                    ready = asyncio.create_task(self.outbox.wait_for_records())
                await self._wait_for_progress(down, flight, None if flight.count else ready)
        finally:
            down.cancel()
            if ready is not None:
                ready.cancel()
            self._hand_over(flight)
        raise LinkError(f"connection lost ({link.disconnect_reason})")

    async def _wait_for_progress(
        self, down: asyncio.Task[Any], flight: _Flight, ready: asyncio.Task[None] | None
    ) -> None:
        """Until the link drops, a message is answered, records arrive or a hold ends."""
        answered = asyncio.create_task(flight.progress.wait())
        waiters: set[asyncio.Future[Any]] = {down, answered}
        if ready is not None:
            waiters.add(ready)
        hold = self._next_hold_end()
        timer = asyncio.create_task(asyncio.sleep(hold)) if hold is not None else None
        if timer is not None:
            waiters.add(timer)
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            answered.cancel()
            if timer is not None:
                timer.cancel()

    def _hand_over(self, flight: _Flight) -> None:
        """Records the broker has acknowledged leave the outbox, in one delete for all the
        answers of one turn of the loop (also while the drain waits on the budget)."""
        flight.hand_over_due = False
        if flight.acked:
            seqs, flight.acked = flight.acked, []
            # The records stay out of leases until the delete commits in the outbox's next group.
            self.outbox.ack_nowait(seqs).add_done_callback(_ack_done)

    async def _next_messages(self, room: int) -> list[_Message]:
        limit = self._message_limit
        held = self._held_kinds()
        records = await self.outbox.lease_encoded(room * 512, room * limit, skip=held)
        overhead = self._overhead
        messages: dict[str, list[_Message]] = {}
        for record in records:
            channel = self._channel_of[record.kind]
            batches = messages.setdefault(channel, [])
            size = len(record.encoded)
            current = batches[-1] if batches else None
            if current is None or overhead[channel] + current.record_bytes + size > limit:
                current = _Message(channel)
                batches.append(current)
            current.seqs.append(record.seq)
            current.encoded.append(record.encoded)
            current.record_bytes += size
        packed = [m for batches in messages.values() for m in batches]
        for message in packed[room:]:
            self.outbox.release(message.seqs)
        return packed[:room]

    async def _spend(self, message: _Message, link: MqttLink) -> None:
        size = message_size(
            self.config.device_id, message.channel, len(message.seqs), message.record_bytes
        )
        while (delay := self._budget.delay(size)) > 0:
            self.stats.state = f"budget wait {delay:.1f}s"
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await link.disconnected.wait()
            if link.disconnected.is_set():
                raise LinkError(f"connection lost ({link.disconnect_reason})")
        self.stats.state = "connected"

    # -- channels the broker refuses ------------------------------------------------------

    def _held_kinds(self) -> set[str]:
        now = self._monotonic()
        for channel, until in list(self._held_until.items()):
            if until <= now:
                del self._held_until[channel]
                self.stats.held_channels.pop(channel, None)
        return {kind for channel in self._held_until for kind in self._kinds_of[channel]}

    def _next_hold_end(self) -> float | None:
        if not self._held_until:
            return None
        return max(0.0, min(self._held_until.values()) - self._monotonic())

    def _hold(self, channel: str, refusal: MessageRefused) -> None:
        """The broker refuses this channel's messages (an ACL, a size or quota limit): keep
        its records, stop sending it for a while (doubling, up to 10 min), let the other
        channels go on, and say so in an event. The connection stays up."""
        self.stats.refused_messages += 1
        self.stats.last_error = str(refusal)
        if channel in self._held_until:  # messages already in flight when the hold began
            return
        hold = min(self._hold_s.get(channel, self.config.refusal_hold_s / 2) * 2, 600.0)
        first = channel not in self._hold_s
        self._hold_s[channel] = hold
        self._held_until[channel] = self._monotonic() + hold
        self.stats.held_channels[channel] = hold
        log.warning("uplink: %s; holding %s for %.0f s", refusal, channel, hold)
        if first and channel != "events":
            event = {
                "event": "uplink_refused",
                "channel": channel,
                "reason_code": refusal.code,
                "reason": str(refusal),
                "hold_s": hold,
            }
            task = asyncio.create_task(self.outbox.put("event", event))
            self._event_tasks.add(task)
            task.add_done_callback(self._event_done)

    def _event_done(self, task: asyncio.Task[Any]) -> None:
        self._event_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("uplink: the refusal event was not kept: %s", task.exception())

    def _sign_all(self, messages: list[_Message]) -> list[bytes]:
        """Encode and sign one refill's messages; run in a worker thread, where libsodium's
        signing (it releases the GIL) overlaps the loop's and paho's work."""
        device, key = self.config.device_id, self._key
        return [encode_batch_raw(device, m.channel, m.encoded, key) for m in messages]

    def _send(self, link: MqttLink, message: _Message, data: bytes, flight: _Flight) -> None:
        """Publish one signed message; `_settled` hears the broker's answer."""
        try:
            link.publish_nowait(
                self._topic[message.channel],
                data,
                lambda error: self._settled(message, len(data), flight, error),
            )
        except LinkError:
            self.outbox.release(message.seqs)
            raise
        flight.count += 1

    def _settled(
        self, message: _Message, size: int, flight: _Flight, error: BaseException | None
    ) -> None:
        flight.count -= 1
        flight.progress.set()
        if error is not None:
            self.outbox.release(message.seqs)
            if isinstance(error, MessageRefused):
                self._hold(message.channel, error)
            return  # LinkDown: the session is ending
        self._hold_s.pop(message.channel, None)
        self.stats.messages += 1
        self.stats.records += len(message.seqs)
        self.stats.bytes += size
        if self.config.budget.bytes_per_day is not None:
            self.outbox.remember("budget_day", self._budget.day)
            self.outbox.remember("budget_spent", self._budget.spent_today)
        flight.acked.extend(message.seqs)
        if not flight.hand_over_due:
            flight.hand_over_due = True
            asyncio.get_running_loop().call_soon(self._hand_over, flight)
