"""Telemetry, health, drift, events and samples, read back: per device or per group, with
server-side downsampling into time buckets (avg/min/max/count of one metric)."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from sqlalchemy import Select, and_, func, select, tuple_

from control_plane.api.deps import Actor, Session, Viewer
from control_plane.api.devices import device_in_scope
from control_plane.api.problems import Problem, problems
from control_plane.api.schemas import (
    DeviceCursor,
    DeviceIdPath,
    DeviceIdQuery,
    DriftPublic,
    DriftSummary,
    EventPublic,
    GroupPath,
    GroupQuery,
    HealthPublic,
    Page,
    RecordCursor,
    RejectionCursor,
    RejectionPublic,
    SamplePublic,
    TelemetryPoint,
    TelemetrySeries,
    TextQuery,
    page_of,
)
from control_plane.db.models import Device, Event, IngestRejection, SampleRow, TelemetryRow

router = APIRouter(tags=["telemetry"])
Metric = Literal[
    "rate_per_s",
    "queue_depth",
    "outbox_depth",
    "latency_p99_ms",
    "cpu_percent",
    "rss_mb",
    "temp_c",
    "uncertain_share",
]
Limit = Annotated[int, Query(ge=1, le=1000)]
MAX_POINTS = 10_000
# Unix seconds, from 1970 to the year 5138: what fits the millisecond columns
Instant = Annotated[float | None, Query(ge=0, le=1e11)]


def _window(
    since: float | None, until: float | None, bucket_s: float | None
) -> tuple[int, int, int]:
    end = until if until is not None else time.time()
    start = since if since is not None else end - 3600
    if start >= end:
        raise Problem(400, "since must be earlier than until")
    bucket = bucket_s if bucket_s is not None else max(1.0, (end - start) / 100)
    if (end - start) / bucket > MAX_POINTS:
        raise Problem(400, f"the window holds more than {MAX_POINTS} buckets; widen bucket_s")
    return int(start * 1000), int(end * 1000), max(1, int(bucket * 1000))


async def _series(
    session: Session,
    where: Any,
    scope: str,
    metric: str,
    since: float | None,
    until: float | None,
    bucket_s: float | None,
) -> TelemetrySeries:
    start, end, bucket_ms = _window(since, until, bucket_s)
    column = getattr(TelemetryRow, metric)
    bucket = (TelemetryRow.ts_ms // bucket_ms) * bucket_ms
    query = (
        select(
            bucket.label("b"), func.count(), func.avg(column), func.min(column), func.max(column)
        )
        .where(where, TelemetryRow.ts_ms >= start, TelemetryRow.ts_ms < end)
        .group_by("b")
        .order_by("b")
    )
    points = [
        TelemetryPoint(t_ms=int(b), count=n, avg=_float(avg), min=_float(lo), max=_float(hi))
        for b, n, avg, lo, hi in await session.execute(query)
    ]
    return TelemetrySeries(scope=scope, metric=metric, bucket_s=bucket_ms / 1000, points=points)


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


@router.get("/v1/devices/{device_id}/telemetry", responses=problems(400, 401, 403, 404))
async def device_telemetry(
    device_id: DeviceIdPath,
    actor: Viewer,
    session: Session,
    metric: Metric = "rate_per_s",
    since: Instant = None,
    until: Instant = None,
    bucket_s: Annotated[float, Query(ge=1, le=86_400 * 366)] | None = None,
) -> TelemetrySeries:
    """One metric of one device over [since, until) (Unix seconds; default the last hour)."""
    await device_in_scope(actor, session, device_id, "telemetry.read")
    return await _series(
        session,
        TelemetryRow.device_id == device_id,
        f"device {device_id}",
        metric,
        since,
        until,
        bucket_s,
    )


@router.get("/v1/groups/{group}/telemetry", responses=problems(400, 401, 403))
async def group_telemetry(
    group: GroupPath,
    actor: Viewer,
    session: Session,
    metric: Metric = "rate_per_s",
    since: Instant = None,
    until: Instant = None,
    bucket_s: Annotated[float, Query(ge=1, le=86_400 * 366)] | None = None,
) -> TelemetrySeries:
    """One metric across every device of a group, bucketed together."""
    await actor.check_group("telemetry.read", group, None)
    members = select(Device.id).where(Device.group == group)
    return await _series(
        session,
        TelemetryRow.device_id.in_(members),
        f"group {group}",
        metric,
        since,
        until,
        bucket_s,
    )


@router.get("/v1/devices/{device_id}/health", responses=problems(401, 403, 404))
async def device_health(device_id: DeviceIdPath, actor: Viewer, session: Session) -> HealthPublic:
    """The latest health report (the `health` part of the newest telemetry record)."""
    device = await device_in_scope(actor, session, device_id, "health.read")
    return HealthPublic(device_id=device_id, at=device.last_health_at, health=device.last_health)


def _event(row: Event) -> EventPublic:
    return EventPublic(
        device_id=row.device_id,
        boot=row.boot,
        seq=row.seq,
        ts_ms=row.ts_ms,
        received_at=row.received_at,
        name=row.name,
        body=row.body,
    )


@router.get("/v1/devices/{device_id}/drift", responses=problems(401, 403, 404))
async def device_drift(device_id: DeviceIdPath, actor: Viewer, session: Session) -> DriftPublic:
    """The latest drift scores the device reported and its most recent drift events."""
    device = await device_in_scope(actor, session, device_id, "drift.read")
    rows = await session.scalars(
        select(Event)
        .where(Event.device_id == device_id, Event.name == "drift")
        .order_by(Event.boot.desc(), Event.seq.desc())
        .limit(20)
    )
    return DriftPublic(
        device_id=device_id, summary=device.last_drift, events=[_event(r) for r in rows]
    )


def _cursor(value: str | None) -> tuple[str, int, int] | None:
    if value is None:
        return None
    try:
        device, boot, seq = value.rsplit(":", 2)
        key = device, int(boot), int(seq)
    except ValueError as exc:
        raise Problem(400, f"cursor {value!r} is not one this API gave out") from exc
    if not (key[1] < 1 << 63 and key[2] < 1 << 63):
        raise Problem(400, f"cursor {value!r} is not one this API gave out")
    return key


def _keyset(model: Any, query: Select[Any], cursor: str | None, limit: int) -> Select[Any]:
    after = _cursor(cursor)
    if after is not None:
        query = query.where(tuple_(model.device_id, model.boot, model.seq) > after)
    return query.order_by(model.device_id, model.boot, model.seq).limit(limit + 1)


def _record_cursor(row: Any) -> str:
    return f"{row.device_id}:{row.boot}:{row.seq}"


async def _scope_filter(
    actor: Actor,
    model: Any,
    device_id: str | None,
    group: str | None,
    session: Session,
    action: str,
) -> Any:
    if device_id is not None:
        await device_in_scope(actor, session, device_id, action)
        return model.device_id == device_id
    if group is not None:
        await actor.check_group(action, group, None)
        return model.device_id.in_(select(Device.id).where(Device.group == group))
    if actor.principal.groups is not None:
        reach = select(Device.id).where(Device.group.in_(sorted(actor.principal.groups)))
        return model.device_id.in_(reach)
    return and_(True)


@router.get("/v1/events", responses=problems(400, 401, 403, 404))
async def list_events(
    actor: Viewer,
    session: Session,
    device_id: DeviceIdQuery = None,
    group: GroupQuery = None,
    name: TextQuery = None,
    cursor: RecordCursor = None,
    limit: Limit = 100,
) -> Page[EventPublic]:
    """Events (drift alarms, outbox drops, ...) by device, boot and sequence."""
    where = await _scope_filter(actor, Event, device_id, group, session, "events.read")
    query = select(Event).where(where)
    if name is not None:
        query = query.where(Event.name == name)
    rows = list(await session.scalars(_keyset(Event, query, cursor, limit)))
    return page_of(rows, limit, _event, _record_cursor)


@router.get("/v1/samples", responses=problems(400, 401, 403, 404))
async def list_samples(
    actor: Viewer,
    session: Session,
    device_id: DeviceIdQuery = None,
    group: GroupQuery = None,
    verdict: TextQuery = None,
    cursor: RecordCursor = None,
    limit: Limit = 100,
) -> Page[SamplePublic]:
    """Uploaded samples' metadata (uncertain and audit); the raw input stays server-side."""
    where = await _scope_filter(actor, SampleRow, device_id, group, session, "samples.read")
    query = select(SampleRow).where(where)
    if verdict is not None:
        query = query.where(SampleRow.verdict == verdict)
    rows = list(await session.scalars(_keyset(SampleRow, query, cursor, limit)))
    return page_of(rows, limit, _sample, _record_cursor)


def _sample(row: SampleRow) -> SamplePublic:
    return SamplePublic(
        device_id=row.device_id,
        boot=row.boot,
        seq=row.seq,
        ts_ms=row.ts_ms,
        verdict=row.verdict,
        model=row.model,
        meta=row.meta,
        input_bytes=len(row.input or b""),
    )


@router.get("/v1/ingest/rejections", responses=problems(400, 401, 403))
async def list_rejections(
    actor: Viewer,
    session: Session,
    device_id: DeviceIdQuery = None,
    cursor: RejectionCursor = None,
    limit: Limit = 100,
) -> Page[RejectionPublic]:
    """Refused uplink messages counted per claimed device and reason. A scoped token sees
    only its devices; an unscoped one also sees devices that are not enrolled."""
    query = (
        select(IngestRejection)
        .order_by(IngestRejection.device_id, IngestRejection.reason)
        .limit(limit + 1)
    )
    if device_id is not None:
        query = query.where(IngestRejection.device_id == device_id)
    if actor.principal.groups is not None:
        reach = select(Device.id).where(Device.group.in_(sorted(actor.principal.groups)))
        query = query.where(IngestRejection.device_id.in_(reach))
    if cursor is not None:
        device, _, reason = cursor.partition(":")
        if not reason:
            raise Problem(400, f"cursor {cursor!r} is not one this API gave out")
        query = query.where(
            tuple_(IngestRejection.device_id, IngestRejection.reason) > (device, reason)
        )
    rows = list(await session.scalars(query))
    return page_of(
        rows, limit, RejectionPublic.model_validate, lambda r: f"{r.device_id}:{r.reason}"
    )


@router.get("/v1/groups/{group}/drift", responses=problems(401, 403))
async def group_drift(
    group: GroupPath,
    actor: Viewer,
    session: Session,
    cursor: DeviceCursor = None,
    limit: Limit = 100,
) -> Page[DriftSummary]:
    """The newest drift scores of every device in a group, with the alarms active."""
    await actor.check_group("drift.read", group, None)
    query = select(Device).where(Device.group == group).order_by(Device.id).limit(limit + 1)
    if cursor is not None:
        query = query.where(Device.id > cursor)
    rows = list(await session.scalars(query))
    return page_of(rows, limit, _drift_summary, lambda d: d.id)


def _drift_summary(device: Device) -> DriftSummary:
    drift = device.last_drift or {}
    alarms = sorted(
        k.removesuffix("_alarm") for k, v in drift.items() if k.endswith("_alarm") and v is True
    )
    return DriftSummary(device_id=device.id, summary=device.last_drift, alarms=alarms)
