"""The control plane's tables (SQLAlchemy 2 declarative). Times are Unix seconds (float) so
SQLite and PostgreSQL store and compare them alike; telemetry's `ts_ms` is the device's
integer milliseconds, bucketed by integer division for downsampling.

Schema changes go through Alembic (control_plane/migrations); `tests` check that the
migrations and these models agree."""

from __future__ import annotations

from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "AuditEntry",
    "Base",
    "Device",
    "DeviceLabel",
    "EnrollmentToken",
    "Event",
    "GroupSetting",
    "IngestRejection",
    "ModelVersion",
    "OperatorToken",
    "PendingTargets",
    "RepositoryMetadata",
    "SampleRow",
    "TelemetryRow",
]

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[str]: JSON}


class OperatorToken(Base):
    """An API token: only its sha256 is kept. `groups` None means every group."""

    __tablename__ = "operator_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    groups: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    created_by: Mapped[str | None] = mapped_column(String(32), nullable=True)
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class AuditEntry(Base):
    """Append-only: who did what, when, from where, and whether it was allowed."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    actor: Mapped[str] = mapped_column(String(160))
    role: Mapped[str | None] = mapped_column(String(16), nullable=True)
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str | None] = mapped_column(String(200), nullable=True)
    outcome: Mapped[str] = mapped_column(String(16))
    source: Mapped[str | None] = mapped_column(String(64), nullable=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class EnrollmentToken(Base):
    """One-time and expiring; only its sha256 is kept."""

    __tablename__ = "enrollment_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    group: Mapped[str] = mapped_column(String(64))
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[float] = mapped_column(Float)
    created_by: Mapped[str] = mapped_column(String(32))
    expires_at: Mapped[float] = mapped_column(Float)
    used_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    device_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    revoked_by: Mapped[str | None] = mapped_column(String(32), nullable=True)


class Device(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    public_key: Mapped[str] = mapped_column(String(64), unique=True)
    group: Mapped[str] = mapped_column(String(64), index=True)
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    status: Mapped[str] = mapped_column(String(16), default="active")
    api_token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    enrolled_at: Mapped[float] = mapped_column(Float)
    enrollment_id: Mapped[str] = mapped_column(String(32))
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    last_seen: Mapped[float | None] = mapped_column(Float, nullable=True)
    software_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    model_name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    model_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    last_health: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    last_health_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_drift: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # on-device fine-tuning (0005): the operator's switch (None: the group's) and the
    # device's label counter, the highest `seq` handed out in device_labels
    personalisation: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    label_seq: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class _RecordKey:
    """(device, boot, seq): the idempotency key of every uplink record."""

    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    boot: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)


class TelemetryRow(_RecordKey, Base):
    """One telemetry record; the figures the API downsamples are columns, the rest `body`."""

    __tablename__ = "telemetry"

    ts_ms: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[float] = mapped_column(Float)
    rate_per_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    queue_depth: Mapped[float | None] = mapped_column(Float, nullable=True)
    outbox_depth: Mapped[float | None] = mapped_column(Float, nullable=True)
    latency_p99_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    cpu_percent: Mapped[float | None] = mapped_column(Float, nullable=True)
    rss_mb: Mapped[float | None] = mapped_column(Float, nullable=True)
    temp_c: Mapped[float | None] = mapped_column(Float, nullable=True)
    uncertain_share: Mapped[float | None] = mapped_column(Float, nullable=True)
    body: Mapped[dict[str, Any]] = mapped_column(JSON)

    __table_args__ = (Index("ix_telemetry_device_ts", "device_id", "ts_ms"),)


class Event(_RecordKey, Base):
    __tablename__ = "events"

    ts_ms: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[float] = mapped_column(Float, index=True)
    name: Mapped[str] = mapped_column(String(64))
    body: Mapped[dict[str, Any]] = mapped_column(JSON)

    __table_args__ = (Index("ix_events_device_ts", "device_id", "ts_ms"),)


class SampleRow(_RecordKey, Base):
    """A kept sample uploaded by a device: its metadata and the raw input bytes."""

    __tablename__ = "samples"

    ts_ms: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[float] = mapped_column(Float)
    verdict: Mapped[str | None] = mapped_column(String(32), nullable=True)
    model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON)
    input: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)


class IngestRejection(Base):
    """Messages refused by ingest, counted per claimed device and reason; never stored."""

    __tablename__ = "ingest_rejections"

    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    reason: Mapped[str] = mapped_column(String(32), primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger)
    first_at: Mapped[float] = mapped_column(Float)
    last_at: Mapped[float] = mapped_column(Float)
    last_error: Mapped[str] = mapped_column(Text)


class RepositoryMetadata(Base):
    """One signed metadata file of the update repository, immutable once written: root,
    targets and snapshot by version (`N.role.json`), every timestamp version too (the newest is
    served as `timestamp.json`). The primary key makes two replicas signing the same next
    version collide instead of both publishing."""

    __tablename__ = "repository_metadata"

    role: Mapped[str] = mapped_column(String(16), primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    sha256: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[float] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)


class PendingTargets(Base):
    """Targets metadata waiting for offline signatures (targets keys off the server): the
    canonical bytes of its `signed` part and the signatures collected so far."""

    __tablename__ = "repository_pending_targets"

    version: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    signed: Mapped[bytes] = mapped_column(LargeBinary)
    signatures: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[float] = mapped_column(Float)


class ModelVersion(Base):
    """A model bundle in the registry: its artifact (stored under the repository's targets),
    lineage, where it may be installed, and the delta patches from its parent."""

    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(64))
    parent_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    target: Mapped[str] = mapped_column(String(200), unique=True)
    sha256: Mapped[str] = mapped_column(String(64))
    length: Mapped[int] = mapped_column(BigInteger)
    channel: Mapped[str] = mapped_column(String(64))
    hardware: Mapped[list[str]] = mapped_column(JSON)
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    patches: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    uploaded_at: Mapped[float] = mapped_column(Float)
    uploaded_by: Mapped[str] = mapped_column(String(160))
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    revoked_by: Mapped[str | None] = mapped_column(String(160), nullable=True)

    __table_args__ = (UniqueConstraint("name", "version", name="uq_model_versions_name_version"),)


class DeviceLabel(Base):
    """A label an operator posted for a sample a device saw (docs/finetune.md): `seq` counts
    1, 2, 3, ... per device, handed out from `Device.label_seq` in the inserting transaction."""

    __tablename__ = "device_labels"

    device_id: Mapped[str] = mapped_column(String(64), ForeignKey("devices.id"), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    sample_id: Mapped[str] = mapped_column(String(128))
    label: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)
    created_by: Mapped[str] = mapped_column(String(160))


class GroupSetting(Base):
    """Per-group settings; `personalisation` None: the default (on)."""

    __tablename__ = "group_settings"

    group: Mapped[str] = mapped_column(String(64), primary_key=True)
    personalisation: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    updated_at: Mapped[float] = mapped_column(Float)
    updated_by: Mapped[str] = mapped_column(String(160))
