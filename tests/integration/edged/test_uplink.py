"""The uplink against a real Mosquitto: signed messages, priority order, outages, a lost
PUBACK, and the last will. Receivers de-duplicate by (device, boot, seq) as the cloud will."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import paho.mqtt.client as paho
from nacl.signing import SigningKey
from paho.mqtt.enums import CallbackAPIVersion

from edged.budget import BudgetConfig
from edged.mqtt_link import LinkConfig
from edged.outbox import Outbox, OutboxConfig
from edged.uplink import Uplink, UplinkConfig
from edged_formats.wire import Batch, decode_batch
from tests.support.subscriber import MqttSubscriber

DEVICE = "dev-test-1"
KEY = SigningKey(b"\x07" * 32)


async def arrived(sub: MqttSubscriber, predicate, timeout: float = 10.0):
    """The subscriber's blocking wait, off the event loop the uplink runs on."""
    return await asyncio.to_thread(sub.wait_for, predicate, timeout)


def decode_all(messages) -> list[Batch]:
    return [
        decode_batch(m.topic, m.payload, lambda d: KEY.verify_key if d == DEVICE else None)
        for m in messages
    ]


def unique_records(messages, channel: str | None = None) -> dict[tuple[int, int], object]:
    """What the cloud keeps: one body per (boot, seq), data channels (or one) only."""
    seen = {}
    for batch in decode_all(messages):
        if batch.channel != "state" and channel in (None, batch.channel):
            for record in batch.records:
                seen.setdefault(record.key, record.body)
    return seen


@contextlib.asynccontextmanager
async def running_uplink(outbox: Outbox, port: int, **overrides):
    config = UplinkConfig(
        DEVICE,
        LinkConfig("127.0.0.1", port, client_id=DEVICE, keepalive_s=5),
        backoff_initial_s=0.05,
        backoff_max_s=0.5,
        **overrides,
    )
    uplink = Uplink(config, outbox, KEY)
    task = asyncio.create_task(uplink.run())
    try:
        yield uplink
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.01)


async def drained(outbox: Outbox, timeout: float = 20.0) -> None:
    async def empty() -> None:
        while outbox.stats().depth:
            await asyncio.sleep(0.02)

    await asyncio.wait_for(empty(), timeout)


def outbox_config(tmp_path: Path, **overrides) -> OutboxConfig:
    return OutboxConfig(tmp_path / "outbox.db", min_free_bytes=0, relaxed_flush_s=0.01, **overrides)


async def test_drains_signed_packed_messages_in_priority_order(tmp_path, broker) -> None:
    """Queued records arrive signed, packed several per message, events before samples,
    and leave the outbox only once acknowledged."""
    with MqttSubscriber(broker.host, broker.port, f"edged/v1/{DEVICE}/#") as sub:
        async with Outbox(outbox_config(tmp_path)) as outbox:
            await outbox.put_many("sample", [{"s": i} for i in range(300)])
            await outbox.put_many("event", [{"e": i} for i in range(5)])
            await outbox.put("telemetry", {"cpu": 0.25})
            async with running_uplink(outbox, broker.port, max_message_bytes=4096) as uplink:
                await drained(outbox)
                await arrived(sub, lambda ms: len(unique_records(ms)) == 306)
            assert uplink.stats.records == 306 and uplink.stats.messages < 50
    batches = decode_all(sub.messages)
    data = [b for b in batches if b.channel != "state"]
    assert data[0].channel == "events"  # highest priority first
    assert {b.channel for b in data} == {"events", "telemetry", "samples"}
    assert all(len(m.payload) <= 4096 for m in sub.messages)
    assert uplink.stats.window == 20  # Mosquitto's Receive Maximum, below our window of 32
    states = [b.records[0].body for b in batches if b.channel == "state"]
    assert states[0] == {"online": True}


async def test_broker_outage_under_load_loses_nothing(tmp_path, broker_factory) -> None:
    """The broker goes away for a while under load: the outbox holds within its quota,
    applies the policy when full (the oldest samples go, the events written meanwhile all
    stay), drains completely when it returns, and every surviving record arrives exactly
    once: the samples missing are one block, the oldest undelivered ones, as many as were
    counted dropped (a lost survivor would leave a second gap)."""
    broker = broker_factory(persistence=True)
    with MqttSubscriber(
        broker.host, broker.port, f"edged/v1/{DEVICE}/#", clean_start=False, session_expiry=600
    ) as sub:
        async with Outbox(
            outbox_config(tmp_path, quota_bytes=512 * 1024, max_record_bytes=16 * 1024)
        ) as outbox:
            produced: list[int] = []

            async def produce(count: int) -> None:
                for _ in range(count):
                    seq = await outbox.put("sample", {"i": len(produced), "pad": b"x" * 500})
                    produced.append(seq)
                    await asyncio.sleep(0.001)

            async with running_uplink(outbox, broker.port) as uplink:
                await produce(200)
                broker.stop()
                await asyncio.wait_for(until(lambda: not uplink.connected.is_set()), 10)
                events = [await outbox.put("event", {"outage": i}) for i in range(50)]
                await produce(1500)  # ~0.8 MB into a 0.5 MB quota while the broker is down
                stats = outbox.stats()
                assert stats.by_class["event"].dropped_quota == 0
                assert stats.stored_bytes <= 512 * 1024
                assert stats.by_class["sample"].dropped_quota > 0
                assert uplink.stats.state != "connected"
                broker.start()
                await produce(100)
                await drained(outbox, timeout=30)
            dropped = outbox.stats().by_class["sample"].dropped_quota
        expected = len(produced) - dropped
        last = set(produced[-100:])

        def complete(messages) -> bool:
            # evicted records still in flight may arrive too: a count alone can be reached early
            records = unique_records(messages, "samples")
            return len(records) >= expected and last <= {seq for _, seq in records}

        received = await arrived(sub, complete, 30)
    records = unique_records(received, "samples")
    assert set(events) <= {seq for _, seq in unique_records(received, "events")}
    seen = {seq for _, seq in records}
    missing = [i for i, seq in enumerate(produced) if seq not in seen]
    assert missing == list(range(missing[0], missing[0] + len(missing))), "a second gap"
    assert len(missing) <= dropped
    # a record evicted while its message was in flight may still arrive: at most a window
    assert expected <= len(records) <= expected + 32 * 64
    assert {seq for _, seq in records} <= set(produced)
    assert uplink.stats.connects >= 2
    bodies = sorted(body["i"] for body in records.values())
    assert bodies[-100:] == list(range(len(produced) - 100, len(produced)))


async def test_lost_puback_is_redelivered_and_deduplicated(tmp_path, broker, fault_proxy) -> None:
    """The broker gets a message but its PUBACK never reaches the device, and the connection
    is cut: the device sends it again, the receiver sees it twice and keeps it once."""
    with MqttSubscriber(broker.host, broker.port, f"edged/v1/{DEVICE}/events") as sub:
        async with Outbox(outbox_config(tmp_path)) as outbox:
            async with running_uplink(outbox, fault_proxy.port) as uplink:
                await asyncio.wait_for(uplink.connected.wait(), 10)
                fault_proxy.pause_downstream()
                await outbox.put("event", {"alarm": "overheat"})
                await arrived(sub, lambda ms: len(ms) >= 1)
                await asyncio.sleep(0.2)
                assert outbox.stats().depth == 1  # no PUBACK: still ours
                fault_proxy.cut()
                fault_proxy.resume_downstream()
                await drained(outbox)
            messages = await arrived(sub, lambda ms: len(ms) >= 2)
    keys = [r.key for b in decode_all(messages) for r in b.records]
    assert len(keys) == 2 and len(set(keys)) == 1
    assert unique_records(messages) == {keys[0]: {"alarm": "overheat"}}


async def test_a_half_open_connection_is_found_by_keepalive(tmp_path, broker, fault_proxy) -> None:
    """The link goes silent without a reset (the broker's answers stop arriving, as on a
    dead NAT mapping): the keep-alive's unanswered PINGREQ ends the connection (5.0 s with a
    2 s keep-alive: one idle period before the PINGREQ, one waiting for its answer), the
    uplink reconnects once answers flow again, and an event put while the link was silent
    arrives (once, after de-duplication)."""
    keepalive = 2
    config = UplinkConfig(
        DEVICE,
        LinkConfig(
            "127.0.0.1",
            fault_proxy.port,
            client_id=DEVICE,
            keepalive_s=keepalive,
            connect_timeout_s=3,
        ),
        backoff_initial_s=0.2,
        backoff_max_s=1.0,
        healthy_after_s=60,
    )
    with MqttSubscriber(broker.host, broker.port, f"edged/v1/{DEVICE}/events") as sub:
        async with Outbox(outbox_config(tmp_path)) as outbox:
            uplink = Uplink(config, outbox, KEY)
            task = asyncio.create_task(uplink.run())
            try:
                await asyncio.wait_for(uplink.connected.wait(), 10)
                fault_proxy.pause_downstream()
                silent_at = time.monotonic()
                await outbox.put("event", {"during": "silence"})
                await asyncio.wait_for(until(lambda: not uplink.connected.is_set()), 20)
                found_after = time.monotonic() - silent_at
                fault_proxy.resume_downstream()
                await asyncio.wait_for(until(lambda: uplink.stats.connects >= 2), 30)
                await drained(outbox)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        messages = await arrived(sub, lambda ms: len(unique_records(ms)) >= 1)
    assert found_after <= 3 * keepalive + 1, found_after
    assert list(unique_records(messages).values()) == [{"during": "silence"}]


async def test_last_will_marks_the_device_offline(tmp_path, broker, fault_proxy) -> None:
    """When the connection dies without a goodbye, the broker publishes the device's signed,
    retained offline state."""
    async with (
        Outbox(outbox_config(tmp_path)) as outbox,
        running_uplink(outbox, fault_proxy.port, healthy_after_s=60) as uplink,
    ):
        await asyncio.wait_for(uplink.connected.wait(), 10)
        fault_proxy.refuse(True)
        fault_proxy.cut()
        with MqttSubscriber(broker.host, broker.port, f"edged/v1/{DEVICE}/state") as sub:
            retained = await arrived(
                sub,
                lambda ms: any(b.records[0].body == {"online": False} for b in decode_all(ms)),
                20,
            )
    assert decode_all(retained)[-1].records[0].body == {"online": False}


async def test_a_fleet_dropped_at_once_does_not_reconnect_at_once(tmp_path, fault_proxy) -> None:
    """Ten devices whose connections were healthy are cut at the same instant while the
    broker stays reachable: each waits a jittered 0 to backoff_initial_s (1 s) before it
    reconnects, so the reconnects spread out instead of arriving together (they came
    within a few ms of each other when a healthy session restarted at once)."""
    devices = 10
    async with contextlib.AsyncExitStack() as stack:
        uplinks = []
        for i in range(devices):
            (tmp_path / str(i)).mkdir()
            outbox = await stack.enter_async_context(Outbox(outbox_config(tmp_path / str(i))))
            config = UplinkConfig(
                f"dev-{i:02d}",
                LinkConfig("127.0.0.1", fault_proxy.port, client_id=f"dev-{i:02d}"),
                backoff_initial_s=1.0,
                healthy_after_s=0.2,
            )
            uplink = Uplink(config, outbox, KEY)
            task = asyncio.create_task(uplink.run())
            stack.callback(task.cancel)
            uplinks.append(uplink)
        await asyncio.wait_for(until(lambda: all(u.stats.connects == 1 for u in uplinks)), 20)
        await asyncio.sleep(0.4)  # every connection is now a healthy one
        cut_at = time.monotonic()
        fault_proxy.cut()
        back_at: dict[int, float] = {}
        while len(back_at) < devices and time.monotonic() - cut_at < 10:
            for i, uplink in enumerate(uplinks):
                if i not in back_at and uplink.stats.connects == 2:
                    back_at[i] = time.monotonic() - cut_at
            await asyncio.sleep(0.005)
    assert len(back_at) == devices, back_at
    delays = sorted(back_at.values())
    assert delays[-1] - delays[0] >= 0.2, delays  # 10 uniform draws on [0, 1]: P < 1e-5
    assert delays[-1] <= 3.0, delays


async def test_bandwidth_budget_holds_messages_back(tmp_path, broker) -> None:
    """With a daily allowance smaller than the backlog, the uplink sends what fits and keeps
    the rest in the outbox for the next day."""
    with MqttSubscriber(broker.host, broker.port, f"edged/v1/{DEVICE}/samples") as sub:
        async with Outbox(outbox_config(tmp_path)) as outbox:
            await outbox.put_many("sample", [{"pad": b"y" * 900} for _ in range(40)])
            budget = BudgetConfig(bytes_per_day=10_000)
            async with running_uplink(
                outbox, broker.port, budget=budget, max_message_bytes=2048
            ) as uplink:
                await arrived(sub, lambda ms: len(unique_records(ms)) >= 8)
                await asyncio.sleep(0.5)
                assert uplink.stats.state.startswith("budget wait")
                assert uplink.stats.bytes <= 10_000
            assert outbox.stats().depth >= 28


async def test_daily_budget_survives_a_restart(tmp_path, broker) -> None:
    """What was sent today is kept in the outbox file, so a restarted uplink does not spend
    the day's allowance a second time."""
    budget = BudgetConfig(bytes_per_day=10_000)
    async with Outbox(outbox_config(tmp_path)) as outbox:
        await outbox.put_many("sample", [{"pad": b"y" * 900} for _ in range(40)])
        async with running_uplink(
            outbox, broker.port, budget=budget, max_message_bytes=2048
        ) as uplink:
            await asyncio.wait_for(until(lambda: uplink.stats.state.startswith("budget")), 10)
            first_day = uplink.stats.bytes
    async with Outbox(outbox_config(tmp_path)) as outbox:
        left = outbox.stats().depth
        async with running_uplink(
            outbox, broker.port, budget=budget, max_message_bytes=2048
        ) as uplink:
            await asyncio.wait_for(until(lambda: uplink.stats.state.startswith("budget")), 10)
            assert first_day + uplink.stats.bytes <= 10_000
            # the budget stops the drain at the publish; the records leave at their PUBACKs
            await asyncio.wait_for(
                until(lambda: outbox.stats().depth == left - uplink.stats.records), 10
            )
        assert outbox.stats().depth == left - uplink.stats.records


async def test_clean_shutdown_says_offline(tmp_path, broker) -> None:
    """Stopping the uplink publishes the retained offline state itself, since a clean
    DISCONNECT makes the broker discard the will."""
    async with (
        Outbox(outbox_config(tmp_path)) as outbox,
        running_uplink(outbox, broker.port) as uplink,
    ):
        await asyncio.wait_for(uplink.connected.wait(), 10)
    with MqttSubscriber(broker.host, broker.port, f"edged/v1/{DEVICE}/state") as sub:
        (retained,) = await arrived(sub, lambda ms: len(ms) >= 1)
    assert decode_all([retained])[0].records[0].body == {"online": False}


async def test_commands_reach_the_device_and_survive_a_reconnect(
    tmp_path, broker, fault_proxy
) -> None:
    """A QoS 1 command on edged/v1/<id>/cmd/<name> reaches the callback, also after the
    connection was cut and re-established."""
    received: list[tuple[str, bytes]] = []
    async with Outbox(outbox_config(tmp_path)) as outbox:
        config = UplinkConfig(
            DEVICE,
            LinkConfig("127.0.0.1", fault_proxy.port, client_id=DEVICE, keepalive_s=5),
            backoff_initial_s=0.05,
            backoff_max_s=0.5,
        )
        uplink = Uplink(config, outbox, KEY, on_command=lambda n, p: received.append((n, p)))
        task = asyncio.create_task(uplink.run())
        sender = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        sender.connect(broker.host, broker.port)
        sender.loop_start()
        try:
            for attempt in range(2):
                await asyncio.wait_for(uplink.connected.wait(), 10)
                await asyncio.sleep(0.3)  # let SUBSCRIBE land
                sender.publish(
                    f"edged/v1/{DEVICE}/cmd/update", b'{"rollout": "r%d"}' % attempt, qos=1
                )
                await asyncio.wait_for(until(lambda n=attempt: len(received) > n), 10)
                if attempt == 0:
                    connects = uplink.stats.connects
                    fault_proxy.cut()
                    # the reconnect can be quicker than a poll of `connected`: count connects
                    await asyncio.wait_for(until(lambda c=connects: uplink.stats.connects > c), 20)
            sender.publish("edged/v1/dev-other/cmd/update", b"{}", qos=1)
            await asyncio.sleep(0.3)
        finally:
            sender.loop_stop()
            sender.disconnect()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert received[:2] == [("update", b'{"rollout": "r0"}'), ("update", b'{"rollout": "r1"}')]
    assert all(name == "update" for name, _ in received)
