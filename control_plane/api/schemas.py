"""Request and response bodies: `...Create` / `...Update` in, `...Public` out. Unknown fields
in a request are refused."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Generic, Literal, TypeVar

from fastapi import Path, Query
from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "BrokerCredentials",
    "DevicePublic",
    "DeviceUpdate",
    "EnrollRequest",
    "EnrollResponse",
    "EnrollmentTokenCreate",
    "EnrollmentTokenCreated",
    "Page",
    "TokenCreate",
    "TokenCreated",
    "TokenPublic",
    "page_of",
]

T = TypeVar("T")
R = TypeVar("R")
GroupName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]
Tag = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:=-]{0,63}$")]
Hex = Annotated[str, Field(pattern=r"^[0-9a-f]+$")]
# Path and query parameters: what an id can be, so nothing else reaches a query.
DEVICE_ID = r"^[a-z0-9-]{1,64}$"
GROUP = r"^[a-z0-9][a-z0-9_-]{0,63}$"
DeviceIdPath = Annotated[str, Path(pattern=DEVICE_ID)]
GroupPath = Annotated[str, Path(pattern=GROUP)]
TokenIdPath = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")]
DeviceIdQuery = Annotated[str | None, Query(pattern=DEVICE_ID)]
GroupQuery = Annotated[str | None, Query(pattern=GROUP)]
TagQuery = Annotated[str | None, Query(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:=-]{0,63}$")]
TextQuery = Annotated[str | None, Query(pattern=r"^[^\x00]{1,200}$")]
# Keyset cursors as the API hands them out in `next_cursor`.
RecordCursor = Annotated[str | None, Query(pattern=r"^[a-z0-9-]{1,64}:[0-9]{1,19}:[0-9]{1,19}$")]
RejectionCursor = Annotated[str | None, Query(pattern=r"^[^:\x00]{1,64}:[a-z_]{1,32}$")]
DeviceCursor = Annotated[str | None, Query(pattern=r"^[a-z0-9-]{1,64}$")]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Page(BaseModel, Generic[T]):
    """One page of a list; pass `next_cursor` back as `cursor` for the next (null: last)."""

    items: list[T]
    next_cursor: str | None


def page_of(
    rows: Sequence[R], limit: int, item: Callable[[R], T], cursor: Callable[[R], str]
) -> Page[T]:
    """The page for `rows` fetched with `limit + 1`: the first `limit` as items, and the
    cursor of the last of them when the extra row says more follow."""
    kept = rows[:limit]
    more = len(rows) > limit
    return Page(items=[item(r) for r in kept], next_cursor=cursor(kept[-1]) if more else None)


class TokenCreate(_In):
    name: Annotated[str, Field(min_length=1, max_length=128)]
    role: Literal["admin", "operator", "viewer"]
    groups: list[GroupName] | None = Field(None, description="null: every group")
    expires_in_s: Annotated[float, Field(gt=0, le=3 * 365 * 86_400)] | None = None


class TokenPublic(BaseModel):
    id: str
    name: str
    role: str
    groups: list[str] | None
    created_at: float
    created_by: str | None
    expires_at: float | None
    revoked_at: float | None


class TokenCreated(TokenPublic):
    token: str = Field(description="the secret; shown once, stored only as a hash")


class EnrollmentTokenCreate(_In):
    group: GroupName = "default"
    tags: list[Tag] = Field(default_factory=list, max_length=32)
    ttl_s: Annotated[float, Field(gt=0, le=30 * 86_400)] | None = None


class EnrollmentTokenCreated(BaseModel):
    id: str
    token: str = Field(description="one-time; shown once, stored only as a hash")
    group: str
    tags: list[str]
    expires_at: float


class EnrollRequest(_In):
    token: Annotated[str, Field(min_length=8, max_length=256)]
    public_key: Annotated[Hex, Field(min_length=64, max_length=64)]
    proof: Annotated[Hex, Field(min_length=128, max_length=128)]
    software_version: Annotated[str, Field(max_length=64)] | None = None


class BrokerCredentials(BaseModel):
    host: str
    port: int
    tls: bool
    username: str
    password: str


class EnrollResponse(BaseModel):
    device_id: str
    group: str
    tags: list[str]
    api_token: str = Field(description="the device's own API token; shown once")
    broker: BrokerCredentials


class DevicePublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    public_key: str
    group: str
    tags: list[str]
    status: str
    online: bool
    enrolled_at: float
    last_seen: float | None
    software_version: str | None
    model_name: str | None
    model_version: str | None
    last_health_at: float | None


class DeviceUpdate(_In):
    group: GroupName | None = None
    tags: list[Tag] | None = Field(None, max_length=32)


class HealthPublic(BaseModel):
    device_id: str
    at: float | None
    health: dict[str, object] | None


class DriftPublic(BaseModel):
    device_id: str
    summary: dict[str, object] | None
    events: list[EventPublic]


class DriftSummary(BaseModel):
    device_id: str
    summary: dict[str, object] | None
    alarms: list[str] = Field(description="the drift statistics whose alarm is active")


class EventPublic(BaseModel):
    device_id: str
    boot: int
    seq: int
    ts_ms: int
    received_at: float
    name: str
    body: dict[str, object]


class SamplePublic(BaseModel):
    device_id: str
    boot: int
    seq: int
    ts_ms: int
    verdict: str | None
    model: str | None
    meta: dict[str, object]
    input_bytes: int


class TelemetryPoint(BaseModel):
    t_ms: int = Field(description="bucket start, Unix milliseconds")
    count: int
    avg: float | None
    min: float | None
    max: float | None


class TelemetrySeries(BaseModel):
    scope: str
    metric: str
    bucket_s: float
    points: list[TelemetryPoint]


class AuditPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    at: float
    actor: str
    role: str | None
    action: str
    target: str | None
    outcome: str
    source: str | None
    detail: dict[str, object]


class RejectionPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    device_id: str
    reason: str
    count: int
    first_at: float
    last_at: float
    last_error: str


DriftPublic.model_rebuild()
