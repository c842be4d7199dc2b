"""Request and response bodies: `...Create` / `...Update` in, `...Public` out. Unknown fields
in a request are refused."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any, Generic, Literal, TypeVar

from fastapi import Path, Query
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from control_plane.auth import SCOPED_ADMIN
from control_plane.rollout_plan import DeviceState
from control_plane.rollout_plan import Status as RolloutStatus

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
__all__ += [
    "LineageEntry",
    "ModelDetail",
    "ModelPublic",
    "PatchPublic",
    "PendingTargetsPublic",
    "RepositoryStatus",
    "TargetsSignatures",
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


def _without_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" not in value
    if isinstance(value, list | tuple):
        return all(_without_nul(v) for v in value)
    return True


class _In(BaseModel):
    """A request body: unknown fields refused, and no text with a NUL character anywhere (a
    PostgreSQL text column refuses it, which was a 500 found by schemathesis)."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        if not _without_nul(value):
            raise ValueError("text must not contain NUL characters")
        return value


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

    @model_validator(mode="after")
    def _admin_unscoped(self) -> TokenCreate:
        if self.role == "admin" and self.groups is not None:
            raise ValueError(SCOPED_ADMIN)
        return self


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


EnrollmentState = Literal["pending", "used", "expired", "revoked"]


class EnrollmentTokenPublic(BaseModel):
    id: str
    group: str
    tags: list[str]
    created_at: float
    created_by: str
    expires_at: float
    state: EnrollmentState
    used_at: float | None
    device_id: str | None = Field(description="the device that redeemed it")
    revoked_at: float | None
    revoked_by: str | None


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
    root: str | None = Field(
        None,
        description="the update repository's current root metadata (JSON text), which the"
        " device keeps as its trusted root; null until a root is installed",
    )


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


# -- model registry and update repository (control_plane.registry, control_plane.repository) --

MODEL_NAME = r"^[a-z0-9][a-z0-9._-]{0,63}$"
ModelNamePath = Annotated[str, Path(pattern=MODEL_NAME)]
ModelVersionPath = Annotated[str, Path(pattern=MODEL_NAME)]
ModelNameQuery = Annotated[str | None, Query(pattern=MODEL_NAME)]
ChannelQuery = Annotated[str, Query(pattern=GROUP, description="the devices' update channel")]
HardwareTag = Annotated[str, Field(pattern=MODEL_NAME)]
HardwareQuery = Annotated[
    list[HardwareTag] | None,
    Query(max_length=32, description="compatibility tags (repeatable); default: any"),
]
ModelCursor = Annotated[str | None, Query(pattern=r"^[0-9]{1,18}$")]
METADATA_FILE = r"^(timestamp|[1-9][0-9]{0,18}\.(root|targets|snapshot))\.json$"
MetadataFilePath = Annotated[str, Path(pattern=METADATA_FILE)]
TARGET_PATH = r"^[a-z0-9_-][a-z0-9._-]{0,127}(/[a-z0-9_-][a-z0-9._-]{0,127}){0,7}$"
TargetPath = Annotated[str, Path(pattern=TARGET_PATH)]


class PatchPublic(BaseModel):
    parent_sha256: str = Field(description="the artifact this patch applies to")
    name: str
    length: int
    sha256: str


class ModelPublic(BaseModel):
    name: str
    version: str
    parent_version: str | None
    target: str = Field(description="the target name in targets metadata")
    sha256: str
    length: int
    channel: str
    hardware: list[str]
    manifest: dict[str, object]
    patches: list[PatchPublic]
    uploaded_at: float
    uploaded_by: str
    revoked_at: float | None
    revoked_by: str | None


class LineageEntry(BaseModel):
    version: str
    sha256: str
    revoked: bool


class ModelDetail(ModelPublic):
    lineage: list[LineageEntry] = Field(description="registered ancestors, the parent first")


class RoleStatus(BaseModel):
    version: int
    expires_at: float
    sha256: str
    signed_at: float


class RepositoryStatus(BaseModel):
    root: RoleStatus | None
    targets: RoleStatus | None
    snapshot: RoleStatus | None
    timestamp: RoleStatus | None
    online_roles: list[str] = Field(description="roles this server holds a threshold of keys for")
    pending_targets: int | None = Field(description="targets version awaiting offline signatures")


class PendingTargetsPublic(BaseModel):
    version: int
    signed: str = Field(description="the canonical JSON the signatures cover, as text")
    keyids: list[str] = Field(description="the targets keys of the current root")
    threshold: int
    signed_by: list[str]


class TargetsSignature(_In):
    keyid: Annotated[Hex, Field(min_length=64, max_length=64)]
    sig: Annotated[Hex, Field(min_length=128, max_length=128)]


class TargetsSignatures(_In):
    version: Annotated[int, Field(ge=1, le=2**63 - 1)]
    signatures: list[TargetsSignature] = Field(min_length=1, max_length=64)


# -- staged rollouts (control_plane.rollouts, control_plane.api.rollouts) --------------------

__all__ += [
    "RolloutCreate",
    "RolloutCriteria",
    "RolloutDevicePublic",
    "RolloutPublic",
    "RolloutSelector",
    "RolloutStage",
    "TargetRef",
    "UpdateAssignment",
]

ROLLOUT_ID = r"^[0-9a-f]{32}$"
RolloutIdPath = Annotated[str, Path(pattern=ROLLOUT_ID)]
RolloutCursor = Annotated[str | None, Query(pattern=ROLLOUT_ID)]
# A TUF target name: relative path segments of [a-z0-9._-], none starting with a dot (so
# never `.` or `..`), as the other routes that take target paths check them.
TargetName = Annotated[
    str,
    Field(
        pattern=r"^[a-z0-9_-][a-z0-9._-]{0,127}(/[a-z0-9_-][a-z0-9._-]{0,127}){0,7}$",
        max_length=200,
        examples=["models/digits/1.3.0.edb"],
    ),
]
ModelVersion = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$", examples=["1.3.0"])]
DeviceId = Annotated[str, Field(pattern=DEVICE_ID)]


class TargetRef(_In):
    target: TargetName
    version: ModelVersion


class RolloutSelector(_In):
    """Which devices: those in `group`, carrying every one of `tags`, and (when listed) among
    `devices`; the filters combine. Only active devices the caller's scope reaches."""

    group: GroupName | None = None
    tags: list[Tag] = Field(default_factory=list, max_length=32)
    devices: list[DeviceId] = Field(default_factory=list, max_length=10_000)

    @model_validator(mode="after")
    def _something(self) -> RolloutSelector:
        if self.group is None and not self.tags and not self.devices:
            raise ValueError("name a group, tags or devices")
        return self


class RolloutStage(_In):
    """A share (`percent`) or a number (`count`) of the targeted devices, cumulative."""

    percent: Annotated[float, Field(gt=0, le=100)] | None = None
    count: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    require_approval: bool = Field(False, description="an operator approves before it starts")

    @model_validator(mode="after")
    def _one(self) -> RolloutStage:
        if (self.percent is None) == (self.count is None):
            raise ValueError("a stage has either a percent or a count")
        return self


class RolloutCriteria(_In):
    """What each stage must show before the next starts; null switches a bound off."""

    min_install_success: Annotated[float, Field(ge=0, le=1)] = 0.95
    max_failed: Annotated[int, Field(ge=0, le=1_000_000)] | None = None
    max_rollbacks: Annotated[int, Field(ge=0, le=1_000_000)] | None = 0
    max_confidence_drop: Annotated[float, Field(ge=0, le=1)] | None = 0.1
    max_latency_ratio: Annotated[float, Field(ge=1, le=1000)] | None = 2.0
    min_devices_reporting: Annotated[
        float,
        Field(gt=0, le=1, description="share of a stage's devices that must have reported"),
    ] = 1.0
    soak_s: Annotated[
        float,
        Field(ge=0, le=30 * 86_400, description="how long after that share reported it waits"),
    ] = 300.0
    stage_timeout_s: (
        Annotated[
            float,
            Field(
                gt=0,
                le=90 * 86_400,
                description="a stage still short of that share this long after it started fails "
                "(on_failure applies); null: it waits for ever",
            ),
        ]
        | None
    ) = None


class RolloutCreate(_In):
    target: TargetName
    version: ModelVersion
    previous: TargetRef | None = Field(
        None, description="what a rollback assigns instead; default: the model's registered parent"
    )
    selector: RolloutSelector
    stages: list[RolloutStage] = Field(min_length=1, max_length=20)
    canaries: list[DeviceId] = Field(
        default_factory=list,
        max_length=100,
        description="targeted devices that go first, in this order (the rest by hash rank)",
    )
    criteria: RolloutCriteria = RolloutCriteria()
    on_failure: Literal["pause", "rollback"] = "pause"

    @model_validator(mode="after")
    def _coherent(self) -> RolloutCreate:
        from control_plane.rollout_plan import PlanError, Stage, check_stages

        if self.previous is not None and self.previous.target == self.target:
            raise ValueError("the previous target is the one being rolled out")
        try:
            check_stages([Stage(s.percent, s.count, s.require_approval) for s in self.stages])
        except PlanError as exc:
            raise ValueError(str(exc)) from exc
        return self


class RolloutStagePublic(BaseModel):
    number: int = Field(description="1 for the first stage")
    percent: float | None
    count: int | None
    require_approval: bool
    devices: int = Field(description="devices this stage adds")
    states: dict[str, int] = Field(description="those devices by state")


class RolloutPublic(BaseModel):
    id: str
    target: str
    version: str
    previous: TargetRef | None
    selector: dict[str, object]
    criteria: RolloutCriteria
    on_failure: str
    status: RolloutStatus
    stage: int = Field(description="the current stage's number; 0 before the first starts")
    stage_started_at: float | None
    stages: list[RolloutStagePublic]
    devices: int
    states: dict[str, int] = Field(description="every targeted device by state")
    reasons: list[str] = Field(description="why it waits, paused or rolled back")
    history: list[dict[str, object]] = Field(description="stages started, approvals, pauses...")
    created_at: float
    created_by: str
    updated_at: float
    finished_at: float | None


class RolloutDevicePublic(BaseModel):
    device_id: str
    stage: int = Field(description="the number of the stage that holds the device")
    state: DeviceState
    assigned_at: float | None
    updated_at: float | None
    last_event: str | None
    reason: str | None = Field(description="why it failed, as the device reported")
    figures: dict[str, float] = Field(description="what its ota.committed report measured")


class UpdateAssignment(BaseModel):
    """What the calling device is to install (docs/ota.md)."""

    rollout: str
    target: str
    version: str


# -- on-device fine-tuning (docs/finetune.md) ---------------------------------------------------

__all__ += [
    "GroupPersonalisationPublic",
    "LabelCursor",
    "LabelIn",
    "LabelPublic",
    "LabelsAccepted",
    "LabelsCreate",
    "PersonalisationDocument",
    "PersonalisationLabel",
    "PersonalisationPublic",
    "PersonalisationUpdate",
]

MAX_SEQ = 2**63 - 1
LabelCursor = Annotated[str | None, Query(pattern=r"^[0-9]{1,18}$")]


class LabelIn(_In):
    sample_id: Annotated[
        str, Field(pattern=r"^[^\x00]{1,128}$", description="the device's sample id or ref")
    ]
    label: Annotated[
        str, Field(pattern=r"^[^\x00]{1,64}$", description="a class name of the device's model")
    ]


class LabelsCreate(_In):
    labels: list[LabelIn] = Field(min_length=1, max_length=1000)


class LabelsAccepted(BaseModel):
    first_seq: int
    last_seq: int
    count: int


class LabelPublic(BaseModel):
    seq: int = Field(description="1, 2, 3, ... per device")
    sample_id: str
    label: str
    created_at: float
    created_by: str


class PersonalisationLabel(BaseModel):
    """A label as devices receive it."""

    seq: int
    sample_id: str
    label: str


class PersonalisationDocument(BaseModel):
    """What a device is told on cmd/personalisation and by its poll (docs/finetune.md)."""

    enabled: bool = Field(description="the operator's switch: device ?? group ?? true")
    labels: list[PersonalisationLabel] = Field(description="ascending by seq")
    last_seq: int = Field(description="the device's highest seq overall; 0: none yet")


class PersonalisationUpdate(_In):
    enabled: bool | None = Field(description="null: inherit (a device: its group's; a group: on)")


class PersonalisationPublic(BaseModel):
    device: bool | None = Field(description="the device's own setting; null: inherit")
    group: bool | None = Field(description="its group's setting; null: the default")
    effective: bool = Field(description="device ?? group ?? true")
    last_seq: int = Field(description="the device's highest label seq; 0: none yet")
    last_report: dict[str, object] | None = Field(
        description="the body of the device's newest stored `finetune` event"
    )


class GroupPersonalisationPublic(BaseModel):
    group: str
    enabled: bool | None = Field(description="null: the default (on)")
    devices: int = Field(description="devices inheriting it, told on cmd/personalisation")
