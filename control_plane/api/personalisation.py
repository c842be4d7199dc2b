"""The control plane's side of on-device fine-tuning (docs/finetune.md, "Labels → Cloud" and
"Operator switch"): operators post labels for a device's samples and switch personalisation
per device and per group; devices read both on `GET /v1/device/self/personalisation` and are
told on MQTT `edged/v1/<id>/cmd/personalisation` (QoS 1) after every change.

Sequence numbers: `devices.label_seq` is the device's counter. A post raises it by the number
of labels with one `UPDATE ... RETURNING` (a row lock on PostgreSQL, the write lock on SQLite)
and inserts the labels under the seqs it reserved, in the same transaction as its audit entry:
concurrent posts get disjoint, contiguous ranges, and a rolled-back post gives its range back.

Delivery is after the commit and never fails a request: the labels are durable, and the
device polls. A post's labels go out in as many messages as keep each under 256 KiB."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Depends, Query, Request
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql import ColumnElement

from control_plane.api.deps import CurrentDevice, Operator, Session, Viewer
from control_plane.api.devices import device_in_scope
from control_plane.api.problems import Problem, problems
from control_plane.api.schemas import (
    MAX_SEQ,
    DeviceIdPath,
    GroupPath,
    GroupPersonalisationPublic,
    LabelCursor,
    LabelPublic,
    LabelsAccepted,
    LabelsCreate,
    Page,
    PersonalisationDocument,
    PersonalisationLabel,
    PersonalisationPublic,
    PersonalisationUpdate,
    page_of,
)
from control_plane.db.engine import Database
from control_plane.db.models import Device, DeviceLabel, Event, GroupSetting
from control_plane.rollouts import MqttNotifier

__all__ = ["MAX_MESSAGE_BYTES", "documents", "router"]

router = APIRouter(tags=["personalisation"])
log = logging.getLogger("control_plane.personalisation")
COMMAND = "personalisation"
MAX_MESSAGE_BYTES = 256 * 1024
GROUP_PAGE = 1000
Limit = Annotated[int, Query(ge=1, le=1000)]
After = Annotated[int, Query(ge=0, le=MAX_SEQ, description="labels with a seq above this")]


async def _notifier(request: Request) -> MqttNotifier | None:  # async: no thread hop
    notifier: MqttNotifier | None = getattr(request.app.state, "notifier", None)
    return notifier


Notifier = Annotated[MqttNotifier | None, Depends(_notifier)]


# -- the document devices get (pure) ------------------------------------------------------------


def _dump(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def documents(
    enabled: bool,
    labels: Sequence[tuple[int, str, str]],
    last_seq: int,
    max_bytes: int = MAX_MESSAGE_BYTES,
) -> list[bytes]:
    """The cmd/personalisation JSON documents for `labels` ((seq, sample_id, label), ascending),
    each at most `max_bytes`: one document, or several when the labels do not fit in one (an
    empty `labels` is one document: the switch alone)."""
    head = _dump({"enabled": enabled, "labels": [], "last_seq": last_seq})
    out: list[bytes] = []
    chunk: list[bytes] = []
    size = len(head)
    for seq, sample_id, label in labels:
        item = _dump({"seq": seq, "sample_id": sample_id, "label": label})
        extra = len(item) + (1 if chunk else 0)
        if chunk and size + extra > max_bytes:
            out.append(_document(head, chunk))
            chunk, size, extra = [], len(head), len(item)
        chunk.append(item)
        size += extra
    if chunk or not out:
        out.append(_document(head, chunk))
    return out


def _document(head: bytes, items: list[bytes]) -> bytes:
    before, after = head.split(b'"labels":[]', 1)
    return before + b'"labels":[' + b",".join(items) + b"]" + after


def _tell(
    notifier: MqttNotifier | None,
    device_id: str,
    enabled: bool,
    labels: Sequence[tuple[int, str, str]],
    last_seq: int,
) -> None:
    if notifier is None:
        return
    for payload in documents(enabled, labels, last_seq):
        notifier.publish(device_id, COMMAND, payload)


# -- reads shared by the routes ----------------------------------------------------------------


async def _group_setting(session: Session, group: str) -> bool | None:
    setting: bool | None = await session.scalar(
        select(GroupSetting.personalisation).where(GroupSetting.group == group)
    )
    return setting


def _effective(device: bool | None, group: bool | None) -> bool:
    if device is not None:
        return device
    return group if group is not None else True


async def _public(session: Session, device: Device) -> PersonalisationPublic:
    group = await _group_setting(session, device.group)
    report = await session.scalar(
        select(Event.body)
        .where(Event.device_id == device.id, Event.name == "finetune")
        .order_by(Event.boot.desc(), Event.seq.desc())
        .limit(1)
    )
    return PersonalisationPublic(
        device=device.personalisation,
        group=group,
        effective=_effective(device.personalisation, group),
        last_seq=device.label_seq,
        last_report=report if isinstance(report, dict) else None,
    )


# -- labels -------------------------------------------------------------------------------------


@router.post(
    "/v1/devices/{device_id}/labels",
    status_code=202,
    responses=problems(401, 403, 404, 409),
)
async def post_labels(
    device_id: DeviceIdPath,
    body: LabelsCreate,
    actor: Operator,
    session: Session,
    notifier: Notifier,
) -> LabelsAccepted:
    """Store labels for samples the device saw, numbered 1, 2, 3, ... per device, and tell
    the device on cmd/personalisation (it also polls). 409 for a decommissioned device."""
    device = await device_in_scope(actor, session, device_id, "device.labels")
    if device.status == "decommissioned":
        raise Problem(409, f"device '{device_id}' is decommissioned")
    count = len(body.labels)
    reserved = (
        await session.execute(
            update(Device)
            .where(Device.id == device_id, Device.status != "decommissioned")
            .values(label_seq=Device.label_seq + count)
            .returning(Device.label_seq, Device.personalisation, Device.group)
            .execution_options(synchronize_session=False)
        )
    ).first()
    if reserved is None:  # decommissioned since it was read
        raise Problem(409, f"device '{device_id}' is decommissioned")
    last_seq, switch, group = reserved
    first_seq = last_seq - count + 1
    now = time.time()
    rows = [(first_seq + i, label.sample_id, label.label) for i, label in enumerate(body.labels)]
    session.add_all(
        DeviceLabel(
            device_id=device_id,
            seq=seq,
            sample_id=sample_id,
            label=label,
            created_at=now,
            created_by=actor.principal.actor,
        )
        for seq, sample_id, label in rows
    )
    enabled = _effective(switch, await _group_setting(session, group))
    actor.audit(
        session, "device.labels", device_id, count=count, first_seq=first_seq, last_seq=last_seq
    )
    await session.commit()
    _tell(notifier, device_id, enabled, rows, last_seq)
    return LabelsAccepted(first_seq=first_seq, last_seq=last_seq, count=count)


@router.get("/v1/devices/{device_id}/labels", responses=problems(401, 403, 404))
async def list_labels(
    device_id: DeviceIdPath,
    actor: Viewer,
    session: Session,
    cursor: LabelCursor = None,
    limit: Limit = 100,
) -> Page[LabelPublic]:
    """The labels posted for the device, ascending by seq."""
    await device_in_scope(actor, session, device_id, "labels.read")
    query = (
        select(DeviceLabel)
        .where(DeviceLabel.device_id == device_id)
        .order_by(DeviceLabel.seq)
        .limit(limit + 1)
    )
    if cursor is not None:
        query = query.where(DeviceLabel.seq > int(cursor))
    rows = list(await session.scalars(query))
    return page_of(
        rows,
        limit,
        lambda r: LabelPublic(
            seq=r.seq,
            sample_id=r.sample_id,
            label=r.label,
            created_at=r.created_at,
            created_by=r.created_by,
        ),
        lambda r: str(r.seq),
    )


@router.get("/v1/device/self/personalisation", tags=["device API"], responses=problems(401))
async def device_personalisation(
    device: CurrentDevice, session: Session, after: After = 0, limit: Limit = 500
) -> PersonalisationDocument:
    """The calling device's switch and its labels with a seq above `after`, ascending
    (device token). `last_seq` is its highest seq overall: more pages follow while the
    last label's seq is below it."""
    group = await _group_setting(session, device.group)
    rows = list(
        await session.execute(
            select(DeviceLabel.seq, DeviceLabel.sample_id, DeviceLabel.label)
            .where(DeviceLabel.device_id == device.id, DeviceLabel.seq > after)
            .order_by(DeviceLabel.seq)
            .limit(limit)
        )
    )
    # the device row was read first: a post committed since may show here but not there
    last_seq = max(device.label_seq, rows[-1][0] if rows else 0)
    return PersonalisationDocument(
        enabled=_effective(device.personalisation, group),
        labels=[PersonalisationLabel(seq=s, sample_id=i, label=c) for s, i, c in rows],
        last_seq=last_seq,
    )


# -- the operator's switch ----------------------------------------------------------------------


@router.get("/v1/devices/{device_id}/personalisation", responses=problems(401, 403, 404))
async def get_personalisation(
    device_id: DeviceIdPath, actor: Viewer, session: Session
) -> PersonalisationPublic:
    """The device's and its group's switch, the effective value (device ?? group ?? on),
    its highest label seq and its newest `finetune` report."""
    device = await device_in_scope(actor, session, device_id, "personalisation.read")
    return await _public(session, device)


@router.put("/v1/devices/{device_id}/personalisation", responses=problems(401, 403, 404, 409))
async def set_device_personalisation(
    device_id: DeviceIdPath,
    body: PersonalisationUpdate,
    actor: Operator,
    session: Session,
    notifier: Notifier,
) -> PersonalisationPublic:
    """Switch personalisation on or off for one device (null: its group decides); the
    device is told on cmd/personalisation. 409 for a decommissioned device."""
    device = await device_in_scope(actor, session, device_id, "device.personalisation")
    if device.status == "decommissioned":
        raise Problem(409, f"device '{device_id}' is decommissioned")
    previous, device.personalisation = device.personalisation, body.enabled
    actor.audit(session, "device.personalisation", device_id, previous=previous, to=body.enabled)
    await session.commit()
    shown = await _public(session, device)
    _tell(notifier, device_id, shown.effective, [], shown.last_seq)
    return shown


@router.put("/v1/groups/{group}/personalisation", responses=problems(401, 403, 409))
async def set_group_personalisation(
    group: GroupPath,
    body: PersonalisationUpdate,
    actor: Operator,
    session: Session,
    notifier: Notifier,
    background: BackgroundTasks,
) -> GroupPersonalisationPublic:
    """Switch personalisation on or off for a group's devices that do not decide for
    themselves (null: the default, on); each of them is told on cmd/personalisation, after the
    answer. A group-scoped operator may set its own groups only."""
    action = "group.personalisation"
    await actor.check_group(action, group, group)
    for attempt in (1, 2):  # two first settings of a group may race to insert its row
        row = await session.get(GroupSetting, group)
        previous = row.personalisation if row is not None else None
        if row is None:
            row = GroupSetting(group=group)
            session.add(row)
        row.personalisation = body.enabled
        row.updated_at, row.updated_by = time.time(), actor.principal.actor
        actor.audit(session, action, group, previous=previous, to=body.enabled)
        try:
            await session.commit()
            break
        except IntegrityError as exc:
            await session.rollback()
            if attempt == 2:
                raise Problem(
                    409, f"group '{group}' personalisation changed under this request; try again"
                ) from exc
    inheriting = await session.scalar(
        select(func.count()).select_from(Device).where(*_inheriting(group))
    )
    if notifier is not None:
        background.add_task(_tell_group, actor.state.db, notifier, group)
    return GroupPersonalisationPublic(group=group, enabled=body.enabled, devices=inheriting or 0)


def _inheriting(group: str) -> tuple[ColumnElement[bool], ...]:
    """Devices of `group` its switch decides for."""
    return (
        Device.group == group,
        Device.personalisation.is_(None),
        Device.status != "decommissioned",
    )


async def _tell_group(db: Database, notifier: MqttNotifier, group: str) -> None:
    """Tell every device of `group` that inherits its switch, a page of devices at a time;
    the switch is read again here, so the last of several quick changes is what goes out."""
    try:
        async with db.session() as session:
            enabled = _effective(None, await _group_setting(session, group))
            after = ""
            while True:
                page = list(
                    await session.execute(
                        select(Device.id, Device.label_seq)
                        .where(*_inheriting(group), Device.id > after)
                        .order_by(Device.id)
                        .limit(GROUP_PAGE)
                    )
                )
                for device_id, last_seq in page:
                    _tell(notifier, device_id, enabled, [], last_seq)
                if len(page) < GROUP_PAGE:
                    return
                after = page[-1][0]
    except Exception:  # the answer went out already; devices poll
        log.exception("telling group %s's devices of their personalisation switch failed", group)
