"""The pure core of ingest: uplink messages in, an `IngestPlan` out (the rows to insert per
table, the device updates, the refusals counted per claimed device and reason). No I/O: the
caller supplies what it knows about each device and writes the plan in one transaction.

A message is refused whole, and never stored, when its topic is not an uplink topic, it is
over the size bound, its device is unknown, quarantined or decommissioned, its signature does
not verify with that device's enrolled key (so a device cannot speak for another even on a
broker that let it publish there), or its CBOR or schema is wrong."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from nacl.signing import VerifyKey

from control_plane.json_codec import bytes_as_json, dumps_json
from edged_formats.errors import MessageError, SignatureError, UnknownDevice
from edged_formats.wire import Batch, Record, WireLimits, check_plain_value, decode_batch

__all__ = ["DeviceInfo", "IngestPlan", "Message", "plan_ingest"]

_TELEMETRY_FIGURES = {
    "rate_per_s": ("rate_per_s",),
    "queue_depth": ("queue_depth",),
    "outbox_depth": ("outbox", "depth"),
    "latency_p99_ms": ("latency_ms", "p99_ms"),
    "cpu_percent": ("health", "proc_cpu_percent"),
    "rss_mb": ("health", "proc_rss_mb"),
    "temp_c": ("health", "temp_c"),
}
_CHANNEL_KIND = {"telemetry": "telemetry", "events": "event", "samples": "sample", "state": "state"}


@dataclass(frozen=True, slots=True)
class Message:
    """One MQTT message as received; `token` is whatever the caller needs to ack it."""

    topic: str
    payload: bytes
    token: Any = None


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    verify_key: VerifyKey
    status: str  # active | quarantined | decommissioned


@dataclass(slots=True)
class DeviceUpdate:
    last_seen: float
    online: bool | None = None
    health: tuple[float, dict[str, Any]] | None = None  # (created, health)
    drift: tuple[float, dict[str, Any]] | None = None
    model: tuple[float, str, str] | None = None
    software_version: str | None = None


@dataclass(slots=True)
class IngestPlan:
    telemetry: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    devices: dict[str, DeviceUpdate] = field(default_factory=dict)
    rejections: dict[tuple[str, str], tuple[int, str]] = field(default_factory=dict)
    accepted: int = 0  # messages

    def reject(self, device: str, reason: str, error: str) -> None:
        count, _ = self.rejections.get((device, reason), (0, ""))
        self.rejections[(device, reason)] = (count + 1, error)

    @property
    def records(self) -> int:
        return len(self.telemetry) + len(self.events) + len(self.samples)


def _claimed_device(topic: str) -> str:
    parts = topic.split("/")
    return (parts[2] if len(parts) > 2 else "?")[:64] or "?"


def json_body(body: Any) -> str:
    """A record body's stored JSON, checked in the same pass (`decode_batch`'s body_check):
    orjson refuses non-text keys and anything but plain values, as the wire does; whatever it
    refuses goes through the wire's own check, which raises the wire's sentence or, for the
    few values orjson cannot write (integers beyond 64-bit signed), passes to the json module."""
    try:
        return orjson.dumps(body, default=bytes_as_json).decode()
    except TypeError:
        check_plain_value(body, "record body")
        return dumps_json(body)


def _text(value: Any, limit: int) -> str:
    """A device-supplied string fit for a text column: NUL removed (PostgreSQL refuses it),
    cut to the column's length."""
    return str(value).replace("\x00", "")[:limit]


def _figure(value: Any) -> float | None:
    kind = type(value)
    if kind is float:
        return value if math.isfinite(value) else None
    return float(value) if kind is int else None


def _figures(body: dict[str, Any]) -> dict[str, float | None]:
    """The telemetry columns the API downsamples, from a record body (None where absent)."""
    out: dict[str, float | None] = dict.fromkeys(_TELEMETRY_FIGURES)
    for name, path in _TELEMETRY_FIGURES.items():
        value: Any = body.get(path[0])
        if len(path) == 2:
            value = value.get(path[1]) if type(value) is dict else None
        if value is not None:
            out[name] = _figure(value)
    return out


def _uncertain_share(body: dict[str, Any]) -> float | None:
    gating = body.get("gating")
    if not isinstance(gating, dict):
        return None
    uncertain, confident = gating.get("uncertain"), gating.get("confident")
    if not isinstance(uncertain, int) or not isinstance(confident, int):
        return None
    total = uncertain + confident
    return uncertain / total if total > 0 else None


def _ts_ms(record: Record) -> int:
    return int(max(0.0, min(record.created, 1e13)) * 1000)


def _key(batch: Batch, record: Record, received: float) -> dict[str, Any]:
    return {
        "device_id": batch.device,
        "boot": record.boot,
        "seq": record.seq,
        "ts_ms": _ts_ms(record),
        "received_at": received,
    }


def _add_records(plan: IngestPlan, batch: Batch, received: float) -> None:
    update = plan.devices.setdefault(batch.device, DeviceUpdate(last_seen=received))
    update.last_seen = max(update.last_seen, received)
    for record, body_json in zip(batch.records, batch.checked, strict=True):
        body = record.body
        if batch.channel == "state":
            if isinstance(body, dict) and isinstance(body.get("online"), bool):
                update.online = body["online"]
            continue
        row = _key(batch, record, received)
        if batch.channel == "telemetry":
            row.update(_figures(body))
            row["uncertain_share"] = _uncertain_share(body)
            row["body"], row["body_json"] = body, body_json
            plan.telemetry.append(row)
            _note_telemetry(update, record.created, body)
        elif batch.channel == "events":
            name = body.get("name")
            row.update(
                name=_text(name if isinstance(name, str) else record.kind, 64),
                body=body,
                body_json=body_json,
            )
            plan.events.append(row)
        else:
            meta = {k: v for k, v in body.items() if k != "input"}
            raw = body.get("input")
            row.update(
                verdict=_text(body["verdict"], 32) if body.get("verdict") is not None else None,
                model=_text(body["model"], 200) if body.get("model") is not None else None,
                meta=meta,
                input=raw if isinstance(raw, bytes) else None,
            )
            plan.samples.append(row)


def _note_telemetry(update: DeviceUpdate, created: float, body: dict[str, Any]) -> None:
    if isinstance(body.get("health"), dict) and (
        update.health is None or created >= update.health[0]
    ):
        update.health = (created, body["health"])
    if isinstance(body.get("drift"), dict) and (update.drift is None or created >= update.drift[0]):
        update.drift = (created, body["drift"])
    model = body.get("model")
    if isinstance(model, dict) and (update.model is None or created >= update.model[0]):
        update.model = (
            created,
            _text(model.get("name", ""), 128),
            _text(model.get("version", ""), 64),
        )
    software = body.get("software_version")
    if isinstance(software, str):
        update.software_version = _text(software, 64)


def _check_bodies(batch: Batch) -> None:
    expected = _CHANNEL_KIND[batch.channel]
    for index, record in enumerate(batch.records):
        if record.kind != expected:
            raise MessageError(
                f"record {index} of kind '{record.kind}' on the {batch.channel} channel"
            )
        if not isinstance(record.body, dict):
            raise MessageError(f"record {index} body is not a map")


def plan_ingest(
    messages: Iterable[Message],
    device_info: Callable[[str], DeviceInfo | None],
    received: float,
    limits: WireLimits,
) -> IngestPlan:
    """Sort messages into rows to store and refusals to count; never raises for bad data."""
    plan = IngestPlan()
    for message in messages:
        claimed = _claimed_device(message.topic)
        info = device_info(claimed)

        def key_for(device: str, info: DeviceInfo | None = info) -> VerifyKey | None:
            return info.verify_key if info is not None else None

        try:
            batch = decode_batch(
                message.topic, message.payload, key_for, limits=limits, body_check=json_body
            )
            _check_bodies(batch)
        except UnknownDevice as exc:
            plan.reject(claimed, "unknown_device", str(exc))
            continue
        except SignatureError as exc:
            plan.reject(claimed, "bad_signature", str(exc))
            continue
        except MessageError as exc:
            plan.reject(claimed, exc.reason, str(exc))
            continue
        assert info is not None
        if info.status != "active":
            plan.reject(claimed, info.status, f"device '{claimed}' is {info.status}")
            continue
        _add_records(plan, batch, received)
        plan.accepted += 1
    return plan
