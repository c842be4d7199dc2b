"""Telemetry ingest: one MQTT 5 client (paho-mqtt 2.x) on a shared subscription
`$share/<group>/edged/v1/+/+`, so several API replicas split the devices' traffic, feeding a
single writer task that stores each batch in one transaction.

Messages are acknowledged (manual PUBACK) only after their batch committed or was counted as
refused, so a crash or a database outage means redelivery, never loss; redelivered records hit
the (device, boot, seq) primary keys and are stored once. The client's Receive Maximum bounds
how many unacknowledged messages the broker hands over, which is the backpressure while the
database is slow. Paho's network thread meets asyncio in `_on_message` / `_on_connect` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from nacl.signing import VerifyKey
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from sqlalchemy import JSON, Boolean, Float, String, Table, bindparam, case, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from tenacity import AsyncRetrying, retry_if_exception, wait_exponential_jitter

from control_plane.db.engine import Database
from control_plane.db.models import Device, Event, IngestRejection, SampleRow, TelemetryRow
from control_plane.ingest_plan import DeviceInfo, IngestPlan, Message, plan_ingest
from control_plane.json_codec import dumps_json
from control_plane.metrics import Metrics
from edged_formats.wire import WireLimits

__all__ = ["Ingest", "IngestConfig"]

log = logging.getLogger("control_plane.ingest")
UPLINK_FILTER = "edged/v1/+/+"
RECORD_KEY = ("device_id", "boot", "seq")
DEVICES: Table = Device.__table__  # type: ignore[assignment]
NULLABLE_JSON = JSON(none_as_null=True)
COPY_THRESHOLD = 64  # rows: below this a plain INSERT is cheaper than the staging round trips


@dataclass(frozen=True, slots=True)
class IngestConfig:
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    group: str = "edged-ingest"
    client_id: str | None = None
    batch: int = 2000
    linger_s: float = 0.05
    batch_bytes: int = 4 << 20  # and at most this much payload per transaction
    writers: int = 2  # batches in flight: one is planned while another is written (PostgreSQL)
    receive_maximum: int = 4_000  # two full batches in flight: bounds memory (~20 KB each)
    session_expiry_s: int = 86_400
    device_cache_s: float = 5.0
    max_message_bytes: int = 1 << 20


def _device_update() -> Any:
    c = DEVICES.c
    health_at = bindparam("b_health_at", type_=Float)
    newer = health_at.is_not(None) & (c.last_health_at.is_(None) | (c.last_health_at <= health_at))
    return (
        update(DEVICES)
        .where(c.id == bindparam("b_id"))
        .values(
            last_seen=bindparam("b_seen", type_=Float),
            online=func.coalesce(bindparam("b_online", type_=Boolean), c.online),
            last_drift=func.coalesce(bindparam("b_drift", type_=NULLABLE_JSON), c.last_drift),
            model_name=func.coalesce(bindparam("b_model", type_=String), c.model_name),
            model_version=func.coalesce(bindparam("b_version", type_=String), c.model_version),
            software_version=func.coalesce(
                bindparam("b_software", type_=String), c.software_version
            ),
            last_health=case(
                (newer, bindparam("b_health", type_=NULLABLE_JSON)), else_=c.last_health
            ),
            last_health_at=case((newer, health_at), else_=c.last_health_at),
        )
    )


_DEVICE_UPDATE = _device_update()


def _copy_records(
    rows: list[dict[str, Any]], columns: list[str], json_columns: set[str]
) -> list[tuple[Any, ...]]:
    return [
        tuple(
            (row.get(f"{c}_json") or dumps_json(row[c])) if c in json_columns else row.get(c)
            for c in columns
        )
        for row in rows
    ]


async def _copy_ignoring_duplicates(
    session: Any, table: Table, rows: list[dict[str, Any]], planner: ThreadPoolExecutor
) -> int:
    """PostgreSQL: COPY the rows into a temporary staging table (binary, no per-row SQL),
    then one INSERT ... SELECT ... ON CONFLICT DO NOTHING; how many were new."""
    columns = [c.name for c in table.columns]
    json_columns = {c.name for c in table.columns if isinstance(c.type, JSON)}
    stage = f"{table.name}_stage"
    # The adapter opens its transaction at the first statement it runs itself: run one, so
    # the COPY below belongs to this batch's transaction (and ON COMMIT clears the stage).
    await session.execute(select(1))
    connection = await session.connection()
    raw = (await connection.get_raw_connection()).driver_connection
    await raw.execute(
        f"CREATE TEMP TABLE IF NOT EXISTS {stage} (LIKE {table.name}) ON COMMIT DELETE ROWS"
    )
    records = await asyncio.get_running_loop().run_in_executor(
        planner, _copy_records, rows, columns, json_columns
    )
    await raw.copy_records_to_table(stage, records=records, columns=columns)
    listed = ", ".join(f'"{c}"' for c in columns)
    inserted = await raw.fetch(
        f"INSERT INTO {table.name} ({listed}) SELECT {listed} FROM {stage} "
        "ORDER BY device_id, boot, seq "  # one lock order for concurrent batches
        "ON CONFLICT (device_id, boot, seq) DO NOTHING RETURNING seq"
    )
    return len(inserted)


def _transient(exc: BaseException) -> bool:
    """Worth retrying as it is: the database is down, unreachable, busy or timed out."""
    if isinstance(exc, OperationalError | InterfaceError | OSError | TimeoutError):
        return True
    # PostgreSQL's deadlock and serialisation failures: the transaction is worth another go
    if getattr(getattr(exc, "orig", None), "sqlstate", None) in ("40P01", "40001"):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


class Ingest:
    """`async with Ingest(config, db, metrics):` subscribes, writes, and stops cleanly."""

    def __init__(self, config: IngestConfig, db: Database, metrics: Metrics) -> None:
        self.config, self.db, self.metrics = config, db, metrics
        self.limits = WireLimits(max_message_bytes=config.max_message_bytes)
        self._queue: asyncio.Queue[Message] = asyncio.Queue()
        self._devices: dict[str, tuple[float, DeviceInfo | None]] = {}
        self._connected = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # Checking and sorting a batch is CPU work (CBOR, signatures, JSON): one thread of its
        # own, so the API's requests keep being served on the event loop meanwhile.
        self._planner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-plan")
        client_id = config.client_id or f"edged-cp-{socket.gethostname()}-{config.group}"
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id[:128],
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        if config.username is not None:
            self._client.username_pw_set(config.username, config.password)
        if config.tls:
            self._client.tls_set(ca_certs=config.ca_file, cert_reqs=ssl.CERT_REQUIRED)
        self._client.reconnect_delay_set(1, 30)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # -- paho's thread ----------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.error("ingest broker refused the connection: %s", reason)
            return
        client.subscribe(f"$share/{self.config.group}/{UPLINK_FILTER}", qos=1)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._set_connected, True)

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop may be closing
            self._loop.call_soon_threadsafe(self._set_connected, False)

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        item = Message(message.topic, bytes(message.payload), (message.mid, message.qos))
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    # -- asyncio -----------------------------------------------------------------------------

    def _set_connected(self, up: bool) -> None:
        self.metrics.broker_connected.set(int(up))
        if up:
            self._connected.set()
        else:
            self._connected.clear()

    async def __aenter__(self) -> Ingest:
        self._loop = asyncio.get_running_loop()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.config.session_expiry_s
        props.ReceiveMaximum = self.config.receive_maximum
        self._client.connect_async(
            self.config.host, self.config.port, keepalive=30, clean_start=False, properties=props
        )
        self._client.loop_start()
        # SQLite takes one writer at a time anyway; PostgreSQL overlaps a batch's planning
        # with the previous one's transaction.
        writers = self.config.writers if self.db.dialect == "postgresql" else 1
        self._tasks = [
            asyncio.create_task(self._writer(), name=f"ingest-writer-{i}") for i in range(writers)
        ]
        return self

    async def wait_connected(self, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            await self._connected.wait()

    async def __aexit__(self, *_exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._planner.shutdown(wait=True)
        self._client.disconnect()
        await asyncio.to_thread(self._client.loop_stop)

    def forget(self, device_id: str) -> None:
        """Drop what is cached about a device (its status changed)."""
        self._devices.pop(device_id, None)

    async def _writer(self) -> None:
        while True:
            batch = [await self._queue.get()]
            size = len(batch[0].payload)
            deadline = time.monotonic() + self.config.linger_s
            while len(batch) < self.config.batch and size < self.config.batch_bytes:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    break
                try:
                    async with asyncio.timeout(timeout):
                        batch.append(await self._queue.get())
                except TimeoutError:
                    break
                size += len(batch[-1].payload)
            while (
                not self._queue.empty()
                and len(batch) < self.config.batch
                and size < self.config.batch_bytes
            ):
                batch.append(self._queue.get_nowait())
                size += len(batch[-1].payload)
            self.metrics.ingest_backlog.set(self._queue.qsize())
            await self._write_with_retry(batch)
            for message in batch:
                mid, qos = message.token
                if qos:
                    self._client.ack(mid, qos)

    async def _write_with_retry(self, batch: Sequence[Message]) -> None:
        """Store the batch; retry while the database is unreachable or busy. A batch the
        database refuses for its data is stored message by message, so one message it cannot
        store is counted as `unstorable` instead of blocking everything behind it."""
        async for attempt in AsyncRetrying(
            wait=wait_exponential_jitter(initial=0.2, max=10),
            retry=retry_if_exception(_transient),
            before_sleep=lambda state: log.error(
                "ingest batch of %d messages not written, retrying: %r",
                len(batch),
                state.outcome.exception() if state.outcome else None,
            ),
        ):
            with attempt:
                try:
                    await self.write(batch)
                except Exception as exc:
                    if _transient(exc):
                        raise
                    await self._isolate(batch, exc)

    async def _isolate(self, batch: Sequence[Message], first: Exception) -> None:
        log.error("ingest batch refused by the database (%r); storing one by one", first)
        for message in batch:
            try:
                await self.write([message])
            except Exception as exc:
                if _transient(exc):
                    raise
                claimed = message.topic.split("/")[2][:64] if message.topic.count("/") >= 2 else "?"
                plan = IngestPlan()
                plan.reject(claimed, "unstorable", f"the database refused it: {exc!r}"[:500])
                async with self.db.session() as session, session.begin():
                    await self._count_rejections(session, plan)
                self.metrics.ingest_rejected.labels(reason="unstorable").inc()
                log.error("ingest could not store a message from %s: %r", claimed, exc)

    async def _device_info(self, devices: set[str]) -> dict[str, DeviceInfo | None]:
        now = time.monotonic()
        known = {d: e[1] for d in devices if (e := self._devices.get(d)) and e[0] > now}
        missing = devices - known.keys()
        if missing:
            async with self.db.session() as session:
                rows = await session.execute(
                    select(Device.id, Device.public_key, Device.status).where(
                        Device.id.in_(sorted(missing))
                    )
                )
                found = {i: DeviceInfo(VerifyKey(bytes.fromhex(k)), s) for i, k, s in rows}
            expiry = now + self.config.device_cache_s
            for device in missing:
                info = found.get(device)
                self._devices[device] = (expiry, info)
                known[device] = info
        return known

    async def write(self, batch: Sequence[Message]) -> IngestPlan:
        """Check, sort and store one batch in one transaction."""
        started = time.perf_counter()
        claimed = {m.topic.split("/")[2] for m in batch if m.topic.count("/") >= 2}
        info = await self._device_info(claimed)
        plan = await asyncio.get_running_loop().run_in_executor(
            self._planner, plan_ingest, batch, info.get, time.time(), self.limits
        )
        async with self.db.session() as session, session.begin():
            stored = 0
            for model, rows, channel in (
                (TelemetryRow, plan.telemetry, "telemetry"),
                (Event, plan.events, "events"),
                (SampleRow, plan.samples, "samples"),
            ):
                if rows:
                    count = await self._insert(session, model, rows)
                    self.metrics.ingest_records.labels(channel=channel).inc(count)
                    stored += count
            await self._update_devices(session, plan)
            await self._count_rejections(session, plan)
        self.metrics.ingest_duplicates.inc(plan.records - stored)
        self.metrics.ingest_messages.labels(outcome="accepted").inc(plan.accepted)
        for (_device, reason), (count, error) in plan.rejections.items():
            self.metrics.ingest_rejected.labels(reason=reason).inc(count)
            log.warning(
                "ingest refused %d message(s) from %s (%s): %s", count, _device, reason, error
            )
        self.metrics.ingest_messages.labels(outcome="refused").inc(len(batch) - plan.accepted)
        self.metrics.ingest_batch_seconds.observe(time.perf_counter() - started)
        return plan

    def _insert_fn(self) -> Any:
        return postgresql.insert if self.db.dialect == "postgresql" else sqlite.insert

    async def _insert(self, session: Any, model: Any, rows: list[dict[str, Any]]) -> int:
        """Insert, ignoring records already stored; how many were new."""
        table = model.__table__
        if self.db.dialect == "postgresql" and len(rows) >= COPY_THRESHOLD:
            return await _copy_ignoring_duplicates(session, table, rows, self._planner)
        rows = [{k: v for k, v in row.items() if not k.endswith("_json")} for row in rows]
        statement = (
            self._insert_fn()(table)
            .on_conflict_do_nothing(index_elements=list(RECORD_KEY))
            .returning(table.c.seq)
        )
        result = await session.execute(statement, rows)
        return len(result.all())

    async def _update_devices(self, session: Any, plan: IngestPlan) -> None:
        """One executemany UPDATE for every device the batch touched: last seen always;
        presence, drift, model and software when the batch says; health only if newer."""
        if not plan.devices:
            return
        params = []
        # In id order, so concurrent batches lock device rows in the same order (no deadlock).
        for device_id, u in sorted(plan.devices.items()):
            online = u.online if u.online is not None else (True if u.health else None)
            params.append(
                {
                    "b_id": device_id,
                    "b_seen": u.last_seen,
                    "b_online": online,
                    "b_drift": u.drift[1] if u.drift else None,
                    "b_model": u.model[1] if u.model else None,
                    "b_version": u.model[2] if u.model else None,
                    "b_software": u.software_version,
                    "b_health": u.health[1] if u.health else None,
                    "b_health_at": u.health[0] if u.health else None,
                }
            )
        await session.execute(_DEVICE_UPDATE, params)

    async def _count_rejections(self, session: Any, plan: IngestPlan) -> None:
        now = time.time()
        for (device, reason), (count, error) in plan.rejections.items():
            statement = self._insert_fn()(IngestRejection).values(
                device_id=device,
                reason=reason,
                count=count,
                first_at=now,
                last_at=now,
                last_error=error[:500],
            )
            statement = statement.on_conflict_do_update(
                index_elements=["device_id", "reason"],
                set_={
                    "count": IngestRejection.count + count,
                    "last_at": now,
                    "last_error": error[:500],
                },
            )
            await session.execute(statement)
