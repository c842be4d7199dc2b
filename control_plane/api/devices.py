"""The device registry: list, read, tag and group, quarantine, release, decommission; and the
device's own view of itself (device token)."""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from sqlalchemy import Row, String, cast, select

from control_plane.api.deps import Actor, CurrentDevice, Operator, Session, State, Viewer
from control_plane.api.problems import Problem, problems
from control_plane.api.schemas import (
    DeviceCursor,
    DeviceIdPath,
    DevicePublic,
    DeviceUpdate,
    GroupQuery,
    Page,
    TagQuery,
    page_of,
)
from control_plane.db.models import Device
from control_plane.errors import ControlPlaneError

router = APIRouter(tags=["devices"])
log = logging.getLogger("control_plane.devices")
Limit = Annotated[int, Query(ge=1, le=1000)]
Status = Literal["active", "quarantined", "decommissioned"]


# what DevicePublic shows: a list loads these columns only (not the health and drift JSON), as
# plain rows: a page builds no ORM objects
_SHOWN = [getattr(Device, name) for name in DevicePublic.model_fields]


def public(device: Device | Row[Any], online_timeout_s: float) -> DevicePublic:
    """The device as the API shows it: online while its presence says so and it was heard
    from within `online_timeout_s` (a silent device is offline even without a last will)."""
    fresh = device.last_seen is not None and time.time() - device.last_seen <= online_timeout_s
    shown = {name: getattr(device, name) for name in DevicePublic.model_fields}
    shown["online"] = bool(device.online and fresh)
    return DevicePublic.model_validate(shown)


async def device_in_scope(actor: Actor, session: Session, device_id: str, action: str) -> Device:
    """The device, if it exists and the caller's scope reaches its group (else 404 / 403)."""
    device = await session.get(Device, device_id)
    if device is None:
        raise Problem(404, f"no device with id '{device_id}'")
    await actor.check_group(action, device.group, device_id)
    return device


@router.get("/v1/devices", responses=problems(401, 403))
async def list_devices(
    actor: Viewer,
    session: Session,
    state: State,
    group: GroupQuery = None,
    tag: TagQuery = None,
    status: Status | None = None,
    online: bool | None = None,
    cursor: DeviceCursor = None,
    limit: Limit = 100,
) -> Page[DevicePublic]:
    """Devices the caller's scope reaches, by id; filters combine."""
    timeout = state.settings.online_timeout_s
    query = select(*_SHOWN).order_by(Device.id).limit(limit + 1)
    in_scope = await actor.group_filter(Device.group, group, "device.list")
    if in_scope is not None:
        query = query.where(in_scope)
    if status is not None:
        query = query.where(Device.status == status)
    if online is not None:
        live = Device.online.is_(True) & (Device.last_seen >= time.time() - timeout)
        query = query.where(live if online else ~live)
    if tag is not None:  # tags are a JSON list of strings: match the quoted element
        pattern = '%"' + tag.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + '"%'
        query = query.where(cast(Device.tags, String).like(pattern, escape="\\"))
    if cursor is not None:
        query = query.where(Device.id > cursor)
    rows = list(await session.execute(query))
    return page_of(rows, limit, lambda d: public(d, timeout), lambda d: d.id)


@router.get("/v1/devices/{device_id}", responses=problems(401, 403, 404))
async def get_device(
    device_id: DeviceIdPath, actor: Viewer, session: Session, state: State
) -> DevicePublic:
    device = await device_in_scope(actor, session, device_id, "device.read")
    return public(device, state.settings.online_timeout_s)


@router.patch("/v1/devices/{device_id}", responses=problems(401, 403, 404, 409))
async def update_device(
    device_id: DeviceIdPath, body: DeviceUpdate, actor: Operator, session: Session, state: State
) -> DevicePublic:
    """Move a device to another group or replace its tags."""
    device = await device_in_scope(actor, session, device_id, "device.update")
    if device.status == "decommissioned":
        raise Problem(409, f"device '{device_id}' is decommissioned")
    changes: dict[str, object] = {}
    if body.group is not None and body.group != device.group:
        await actor.check_group("device.update", body.group, device_id)
        changes["group"] = {"from": device.group, "to": body.group}
        device.group = body.group
    if body.tags is not None:
        changes["tags"] = sorted(set(body.tags))
        device.tags = sorted(set(body.tags))
    actor.audit(session, "device.update", device_id, **changes)
    await session.commit()
    return public(device, state.settings.online_timeout_s)


async def _set_status(
    device_id: str, status: str, actor: Actor, session: Session, state: State
) -> DevicePublic:
    action = {
        "quarantined": "device.quarantine",
        "active": "device.release",
        "decommissioned": "device.decommission",
    }[status]
    device = await device_in_scope(actor, session, device_id, action)
    if device.status == "decommissioned":
        raise Problem(409, f"device '{device_id}' is decommissioned")
    previous = device.status
    device.status = status
    if status == "decommissioned":
        device.online = False
        try:
            await state.broker_admin.revoke_device(device_id)
        except ControlPlaneError as exc:
            raise Problem(
                502, f"the broker did not revoke the device's credentials: {exc}"
            ) from exc
    actor.audit(session, action, device_id, previous=previous)
    await session.commit()
    if state.ingest is not None:
        state.ingest.forget(device_id)
    return public(device, state.settings.online_timeout_s)


@router.post("/v1/devices/{device_id}/quarantine", responses=problems(401, 403, 404, 409))
async def quarantine_device(
    device_id: DeviceIdPath, actor: Operator, session: Session, state: State
) -> DevicePublic:
    """Stop accepting the device's data: its messages are counted as refused, not stored."""
    return await _set_status(device_id, "quarantined", actor, session, state)


@router.post("/v1/devices/{device_id}/release", responses=problems(401, 403, 404, 409))
async def release_device(
    device_id: DeviceIdPath, actor: Operator, session: Session, state: State
) -> DevicePublic:
    """Accept the device's data again after a quarantine."""
    return await _set_status(device_id, "active", actor, session, state)


@router.post("/v1/devices/{device_id}/decommission", responses=problems(401, 403, 404, 409, 502))
async def decommission_device(
    device_id: DeviceIdPath, actor: Operator, session: Session, state: State
) -> DevicePublic:
    """Retire a device for good: its broker account is deleted (a connected session is
    dropped), its API token stops working, and its history stays queryable."""
    return await _set_status(device_id, "decommissioned", actor, session, state)


@router.get("/v1/device/self", tags=["device API"], responses=problems(401))
async def device_self(device: CurrentDevice, state: State) -> DevicePublic:
    """What the control plane knows about the calling device (device token)."""
    return public(device, state.settings.online_timeout_s)
