"""Staged rollouts' tables (migration 0004_rollouts).

`rollouts` holds one row per rollout: what it installs (a TUF target name and version; the
previous one for a rollback), whom it targets, its stages, criteria and where it stands.
`revision` is SQLAlchemy's version counter, so the engine's tick and an operator's action
never overwrite each other (the loser gets StaleDataError and tries again).

`rollout_devices` holds one row per targeted device, fixed at creation. `active_device_id`
is the device id while the rollout is active and NULL afterwards; its unique constraint is
what keeps a device in at most one active rollout, whatever the number of replicas."""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from control_plane.db.models import Base

__all__ = ["Rollout", "RolloutDevice"]


class Rollout(Base):
    __tablename__ = "rollouts"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # time-ordered hex
    target: Mapped[str] = mapped_column(String(200))
    version: Mapped[str] = mapped_column(String(64))
    previous_target: Mapped[str | None] = mapped_column(String(200), nullable=True)
    previous_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    selector: Mapped[dict[str, Any]] = mapped_column(JSON)
    stages: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    criteria: Mapped[dict[str, Any]] = mapped_column(JSON)
    on_failure: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(24), index=True)
    stage: Mapped[int] = mapped_column(Integer, default=-1)
    stage_started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    approved_through: Mapped[int] = mapped_column(Integer, default=-1)
    accepted_through: Mapped[int] = mapped_column(Integer, default=-1)
    reasons: Mapped[list[str]] = mapped_column(JSON, default=list)
    history: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    event_cursor: Mapped[float] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)
    created_by: Mapped[str] = mapped_column(String(160))
    updated_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    revision: Mapped[int] = mapped_column(Integer)

    __mapper_args__ = {"version_id_col": revision}  # noqa: RUF012 (declarative reads a dict)


class RolloutDevice(Base):
    __tablename__ = "rollout_devices"

    rollout_id: Mapped[str] = mapped_column(String(32), ForeignKey("rollouts.id"), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64), ForeignKey("devices.id"), primary_key=True)
    stage: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    active_device_id: Mapped[str | None] = mapped_column(String(64), unique=True, nullable=True)
    assigned_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    updated_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_boot: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    last_seq: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    last_event: Mapped[str | None] = mapped_column(String(64), nullable=True)
    progressed: Mapped[bool] = mapped_column(Boolean, default=False)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    figures: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
