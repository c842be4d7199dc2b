"""Uplink benchmark: draining the outbox to a broker against a bare paho QoS 1 publish loop.

One Mosquitto on a free loopback port serves every round (`max_inflight_messages 100`, so its
CONNACK Receive Maximum lets both clients keep 100 messages in flight; nobody subscribes). Each
round, in rotating order:

- unpacked: a fresh outbox preloaded with `UNPACKED_RECORDS` sample records whose bodies are
  just big enough that two never fit one message at the smallest `max_message_bytes` (1 KiB),
  so every message carries exactly one record; an Uplink (window 100, link max_inflight 100)
  drains it. Timed from the connection being up (state message sent) until the outbox is
  empty (polled every millisecond): every record PUBACKed and its delete committed.
  messages/s here is the like-for-like figure: one signed message per record, as the bare
  loop sends one payload per publish. It is the benchmark's value.
- packed: a fresh outbox preloaded with `PACKED_RECORDS` ~100-byte sample records, drained
  with the default `max_message_bytes` (64 KiB): records/s is what packing buys.
- bare: `bench.mqtt_baseline.bare_publish_rate` with 100-byte payloads (the baseline), and
  again with payloads the size of the unpacked messages (a size-matched check).

Each figure is the median of the rounds. The ratio is unpacked messages/s over the bare
100-byte loop's messages/s; `records_per_s` is the packed drain's, also given over the bare
loop's messages/s (`records_per_s_vs_bare`). The CPU figures are this process's CPU time (all
threads: event loop, paho's network thread, aiosqlite's) per message or record, the broker's
excluded: on a GIL-bound client they say where the drain rate goes. `sign_us_per_message` is
what encoding and signing one unpacked message costs on one thread with nothing else running:
the part of the drain's CPU per message that the bare loop does not have at all.
`window_used` is the window the uplink actually kept (its configured window capped by the
broker's Receive Maximum).
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

from bench.common import Result, conditions, median
from bench.mqtt_baseline import MAX_INFLIGHT, _mosquitto_version, bare_publish_rate
from edged.mqtt_link import LinkConfig
from edged.outbox import Outbox, OutboxConfig
from edged.uplink import Uplink, UplinkConfig
from edged_formats.wire import Record, encode_batch_raw, encode_record, message_size

__all__ = ["run"]

ROUNDS = 7
DEVICE = "bench-dev-1"
KEY = SigningKey(b"\x05" * 32)
WINDOW = MAX_INFLIGHT  # the bare loop's max inflight
UNPACKED_RECORDS = 8_000
UNPACKED_MAX_MESSAGE = 1024  # UplinkConfig's minimum
PACKED_RECORDS = 20_000
PACKED_BODY_BYTES = 97  # bytes of CBOR: 99 with its head, ~125 as an encoded record
BARE_PAYLOAD = 100
BARE_MESSAGES = 8_000
BARE_WARMUP = 500  # bare_publish_rate's default
PRELOAD_CHUNK = 1_000
DRAIN_TIMEOUT_S = 60.0
POLL_S = 0.001
TARGETS = {"records_per_s_vs_bare": "records_per_s_vs_bare >= 2"}  # "far above 1x"


@dataclass
class _Drain:
    seconds: float
    messages: int
    records: int
    bytes: int
    window: int
    cpu_s: float  # this process's CPU time (every thread) over the drain


@dataclass
class _Rounds:
    unpacked: list[_Drain] = field(default_factory=list)
    packed: list[_Drain] = field(default_factory=list)
    bare: list[float] = field(default_factory=list)
    bare_cpu_us: list[float] = field(default_factory=list)
    bare_matched: list[float] = field(default_factory=list)
    sign_us: list[float] = field(default_factory=list)


def run() -> Result:
    from control_plane.local_broker import MosquittoBroker

    unpacked_body = _unpacked_body_bytes()
    with (
        tempfile.TemporaryDirectory(prefix="edged-bench-uplink-") as tmp,
        MosquittoBroker(max_inflight_messages=MAX_INFLIGHT) as broker,
    ):
        started = time.perf_counter()
        rounds = asyncio.run(_measure(Path(tmp), broker.host, broker.port, unpacked_body))
        elapsed = time.perf_counter() - started
        broker_version = _mosquitto_version(str(broker.binary))
    unpacked_msg_s = median([d.messages / d.seconds for d in rounds.unpacked])
    unpacked_rec_s = median([d.records / d.seconds for d in rounds.unpacked])
    packed_msg_s = median([d.messages / d.seconds for d in rounds.packed])
    packed_rec_s = median([d.records / d.seconds for d in rounds.packed])
    bare, bare_matched = median(rounds.bare), median(rounds.bare_matched)
    unpacked_size = median([d.bytes / d.messages for d in rounds.unpacked])
    per_round = [
        (d.messages / d.seconds) / b for d, b in zip(rounds.unpacked, rounds.bare, strict=True)
    ]
    metrics: dict[str, Any] = {
        "records_per_s": round(packed_rec_s, 1),
        "records_per_s_vs_bare": round(packed_rec_s / bare, 3),
        "messages_per_s_unpacked": round(unpacked_msg_s, 1),
        "messages_per_s_packed": round(packed_msg_s, 1),
        "records_per_s_unpacked": round(unpacked_rec_s, 1),
        "records_per_message_packed": round(
            median([d.records / d.messages for d in rounds.packed]), 1
        ),
        "message_bytes_unpacked": round(unpacked_size, 1),
        "message_bytes_packed": round(median([d.bytes / d.messages for d in rounds.packed]), 1),
        "bare_msg_s_100b": round(bare, 1),
        "bare_msg_s_size_matched": round(bare_matched, 1),
        "ratio_size_matched": round(unpacked_msg_s / bare_matched, 4),
        "ratio_min": round(min(per_round), 4),
        "ratio_max": round(max(per_round), 4),
        "rounds_messages_per_s_unpacked": [
            round(d.messages / d.seconds, 1) for d in rounds.unpacked
        ],
        "rounds_records_per_s_packed": [round(d.records / d.seconds, 1) for d in rounds.packed],
        "rounds_bare_msg_s": [round(v, 1) for v in rounds.bare],
        "cpu_us_per_message_unpacked": round(
            median([d.cpu_s * 1e6 / d.messages for d in rounds.unpacked]), 1
        ),
        "cpu_us_per_record_packed": round(
            median([d.cpu_s * 1e6 / d.records for d in rounds.packed]), 2
        ),
        "bare_cpu_us_per_message": round(median(rounds.bare_cpu_us), 1),
        # what one ed25519 signature of an unpacked message costs alone (one thread, no
        # contention): the floor of the signed drain's CPU above the bare loop's
        "sign_us_per_message": round(median(rounds.sign_us), 1),
        "sign_share_of_bare_cpu": round(median(rounds.sign_us) / median(rounds.bare_cpu_us), 3),
        # a CPU-bound client that did the bare loop's work plus one signature per message and
        # nothing else: the most the signed drain's ratio can be on this machine
        "ratio_ceiling_signed": round(
            median(rounds.bare_cpu_us) / (median(rounds.bare_cpu_us) + median(rounds.sign_us)), 3
        ),
        "window_used": min(d.window for d in rounds.unpacked + rounds.packed),
        "measure_s": round(elapsed, 2),
    }
    return Result(
        name="uplink",
        value=round(unpacked_msg_s, 1),
        unit="msg/s",
        baseline=round(bare, 1),
        baseline_is=(
            f"bare paho-mqtt QoS 1 publish loop (bench.mqtt_baseline), {BARE_PAYLOAD}-byte "
            f"payloads, max inflight {MAX_INFLIGHT}, same broker, interleaved rounds; value is "
            f"the UNPACKED drain (one record per signed message, max_message_bytes "
            f"{UNPACKED_MAX_MESSAGE}), the like-for-like messages/s comparison"
        ),
        target="ratio >= 0.8",
        metrics=metrics,
        targets=TARGETS,
        conditions=conditions(
            broker=broker_version,
            broker_config=(
                f"loopback, no persistence, max_queued_messages 100000, max_inflight_messages "
                f"{MAX_INFLIGHT} (CONNACK Receive Maximum {MAX_INFLIGHT}), no subscriber"
            ),
            rounds=ROUNDS,
            window=WINDOW,
            link_max_inflight=WINDOW,
            unpacked=(
                f"{UNPACKED_RECORDS} sample records of {unpacked_body} body bytes, "
                f"max_message_bytes {UNPACKED_MAX_MESSAGE}: one record per message"
            ),
            packed=(
                f"{PACKED_RECORDS} sample records of {PACKED_BODY_BYTES} body bytes, "
                f"max_message_bytes 64 KiB (default)"
            ),
            bare_messages=BARE_MESSAGES,
            bare_size_matched_payload=round(unpacked_size),
            timing=(
                "from Uplink.connected (CONNACK and the retained state message done) until "
                "the outbox's depth is 0, polled every 1 ms (every record PUBACKed and its "
                "delete committed); preloading and connecting are outside the clock"
            ),
            signing="ed25519 (pynacl), every message",
            cpu_figures=(
                "time.process_time() of this process (event loop, paho and aiosqlite threads; "
                "not the broker) per message or record; the bare figure includes its connection "
                "and 500-message warm-up"
            ),
            paho_mqtt=metadata.version("paho-mqtt"),
        ),
    )


def _unpacked_body_bytes() -> int:
    """The smallest bytes body for which two records never share a 1 KiB message (sized
    with the smallest boot, seq and created a record can have)."""
    for body in range(64, UNPACKED_MAX_MESSAGE):
        smallest = len(encode_record(Record("sample", 0, 0, 0.0, bytes(body))))
        if message_size(DEVICE, "samples", 2, 2 * smallest) > UNPACKED_MAX_MESSAGE:
            return body
    raise RuntimeError("no body size keeps messages to one record")


def _sign_cost_us(body: int, count: int = 2_000) -> float:
    """Microseconds per signed unpacked message, encoding included, on this thread alone."""
    encoded = [encode_record(Record("sample", 1, 1, 0.0, bytes(body)))]
    started = time.perf_counter()
    for _ in range(count):
        encode_batch_raw(DEVICE, "samples", encoded, KEY)
    return (time.perf_counter() - started) * 1e6 / count


async def _measure(workdir: Path, host: str, port: int, unpacked_body: int) -> _Rounds:
    rounds = _Rounds()
    matched_payload = 0

    async def unpacked(index: int) -> None:
        nonlocal matched_payload
        drain = await _drain(
            workdir / f"unpacked-{index}.db",
            host,
            port,
            f"bench-unpacked-{index}",
            [bytes(unpacked_body)] * UNPACKED_RECORDS,
            UNPACKED_MAX_MESSAGE,
        )
        rounds.unpacked.append(drain)
        matched_payload = matched_payload or round(drain.bytes / drain.messages)

    async def packed(index: int) -> None:
        drain = await _drain(
            workdir / f"packed-{index}.db",
            host,
            port,
            f"bench-packed-{index}",
            [bytes(PACKED_BODY_BYTES)] * PACKED_RECORDS,
            64 * 1024,
        )
        rounds.packed.append(drain)

    async def bare(index: int) -> None:
        started_cpu = time.process_time()
        rounds.bare.append(
            await asyncio.to_thread(bare_publish_rate, host, port, BARE_PAYLOAD, BARE_MESSAGES)
        )
        cpu = time.process_time() - started_cpu  # connection and warm-up included
        rounds.bare_cpu_us.append(cpu * 1e6 / (BARE_MESSAGES + BARE_WARMUP))

    async def bare_matched(index: int) -> None:
        payload = matched_payload or 600
        rounds.bare_matched.append(
            await asyncio.to_thread(bare_publish_rate, host, port, payload, BARE_MESSAGES)
        )

    async def sign(index: int) -> None:
        rounds.sign_us.append(_sign_cost_us(unpacked_body))

    variants: list[Callable[[int], Any]] = [unpacked, bare, packed, bare_matched, sign]
    await unpacked(-1)  # warm-up (and the unpacked message size), not counted
    rounds.unpacked.clear()
    for index in range(ROUNDS):
        shift = index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            await variant(index)
    return rounds


async def _drain(
    path: Path,
    host: str,
    port: int,
    client_id: str,
    bodies: list[Any],
    max_message_bytes: int,
) -> _Drain:
    """Preload a fresh outbox with `bodies`, then time an Uplink draining it."""
    config = OutboxConfig(path, quota_bytes=1 << 30, min_free_bytes=0)
    async with Outbox(config) as outbox:
        for start in range(0, len(bodies), PRELOAD_CHUNK):
            await outbox.put_many("sample", bodies[start : start + PRELOAD_CHUNK])
        uplink = Uplink(
            UplinkConfig(
                DEVICE,
                LinkConfig(host, port, client_id=client_id, max_inflight=WINDOW),
                max_message_bytes=max_message_bytes,
                window=WINDOW,
            ),
            outbox,
            KEY,
        )
        task = asyncio.create_task(uplink.run())
        try:
            await asyncio.wait_for(uplink.connected.wait(), 10)
            started, started_cpu = time.perf_counter(), time.process_time()
            deadline = started + DRAIN_TIMEOUT_S
            # Polled, not hooked: the outbox's depth falls only when a delete has committed.
            while outbox.stats().depth > 0:
                if task.done() or time.perf_counter() > deadline:
                    raise RuntimeError(
                        f"uplink drained {len(bodies) - outbox.stats().depth} of {len(bodies)} "
                        f"records ({uplink.stats.state}, {uplink.stats.last_error})"
                    )
                await asyncio.sleep(POLL_S)
            elapsed = time.perf_counter() - started
            cpu = time.process_time() - started_cpu
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if uplink.stats.records != len(bodies):
            raise RuntimeError(f"{uplink.stats.records} of {len(bodies)} records published")
        stats = uplink.stats
        window = stats.window
    for suffix in ("", "-wal", "-shm", ".boot"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return _Drain(elapsed, stats.messages, stats.records, stats.bytes, window, cpu)
