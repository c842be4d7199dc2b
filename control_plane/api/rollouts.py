"""Staged rollouts: create (operator), read (viewer), approve / pause / resume / abort
(operator), and the device's own question "what should I install?" (device token).

A rollout's devices are fixed when it is created: the active devices its selector matches
within the caller's scope, each placed in a stage by control_plane.rollout_plan.membership.
The engine (control_plane.rollouts) does the rest; routes only change the rollout's status
and wake it. A caller reaches a rollout when its scope reaches the group of every device the
rollout targets; otherwise 403, audited."""

from __future__ import annotations

import secrets
import time
from collections import defaultdict
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy import String, cast, distinct, func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm.exc import StaleDataError

from control_plane.api.deps import Actor, CurrentDevice, Operator, Session, Viewer
from control_plane.api.problems import Problem, problems
from control_plane.api.schemas import (
    DeviceCursor,
    Page,
    RolloutCreate,
    RolloutCriteria,
    RolloutCursor,
    RolloutDevicePublic,
    RolloutIdPath,
    RolloutPublic,
    RolloutStagePublic,
    TargetRef,
    UpdateAssignment,
    page_of,
)
from control_plane.db.models import Device, ModelVersion
from control_plane.db.rollouts import Rollout, RolloutDevice
from control_plane.registry import find
from control_plane.rollout_plan import (
    ACTIVE,
    DeviceState,
    Stage,
    Status,
    membership,
    stage_sizes,
)
from control_plane.rollouts import release

router = APIRouter(tags=["rollouts"])
Limit = Annotated[int, Query(ge=1, le=1000)]
MAX_DEVICES = 100_000
CHUNK = 5_000
FORWARD = ("assigned", "installing", "committed")
REVERT = ("reverting", "reverted")
_CONFLICT = "the rollout changed meanwhile; read it again and retry"
ACT_ATTEMPTS = 3  # an operator action meeting a concurrent change is tried on the new state


def _wake(request: Request) -> None:
    engine = getattr(request.app.state, "rollouts", None)
    if engine is not None:
        engine.wake()


def _new_id(now: float) -> str:
    """32 hex digits that sort by creation time (milliseconds first)."""
    return f"{int(now * 1000):012x}{secrets.token_hex(10)}"


def _tag_like(tag: str) -> Any:
    pattern = '%"' + tag.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + '"%'
    return cast(Device.tags, String).like(pattern, escape="\\")


async def _public(session: Session, row: Rollout) -> RolloutPublic:
    return (await _publics(session, [row]))[0]


async def _publics(session: Session, rows: list[Rollout]) -> list[RolloutPublic]:
    """The rollouts as the API shows them, with their devices counted in one query."""
    counts: dict[str, dict[int, dict[str, int]]] = defaultdict(lambda: defaultdict(dict))
    if rows:
        grouped = await session.execute(
            select(RolloutDevice.rollout_id, RolloutDevice.stage, RolloutDevice.state, func.count())
            .where(RolloutDevice.rollout_id.in_([r.id for r in rows]))
            .group_by(RolloutDevice.rollout_id, RolloutDevice.stage, RolloutDevice.state)
        )
        for rollout_id, stage, state, n in grouped:
            counts[rollout_id][stage][state] = n
    out = []
    for row in rows:
        per_stage = counts[row.id]
        states: dict[str, int] = defaultdict(int)
        for stage_states in per_stage.values():
            for state, n in stage_states.items():
                states[state] += n
        stages = [
            RolloutStagePublic(
                number=i + 1,
                percent=s.get("percent"),
                count=s.get("count"),
                require_approval=bool(s.get("require_approval")),
                devices=sum(per_stage[i].values()) if i in per_stage else 0,
                states=dict(per_stage[i]) if i in per_stage else {},
            )
            for i, s in enumerate(row.stages)
        ]
        previous = (
            TargetRef(target=row.previous_target, version=row.previous_version)
            if row.previous_target is not None and row.previous_version is not None
            else None
        )
        out.append(
            RolloutPublic(
                id=row.id,
                target=row.target,
                version=row.version,
                previous=previous,
                selector=row.selector,
                criteria=RolloutCriteria(**row.criteria),
                on_failure=row.on_failure,
                status=row.status,  # type: ignore[arg-type]
                stage=row.stage + 1,
                stage_started_at=row.stage_started_at,
                stages=stages,
                devices=sum(states.values()),
                states=dict(states),
                reasons=list(row.reasons),
                history=list(row.history),
                created_at=row.created_at,
                created_by=row.created_by,
                updated_at=row.updated_at,
                finished_at=row.finished_at,
            )
        )
    return out


async def _in_scope(actor: Actor, session: Session, rollout_id: str, action: str) -> Rollout:
    """The rollout, if it exists and the caller reaches all its devices' groups."""
    row = await session.get(Rollout, rollout_id)
    if row is None:
        raise Problem(404, f"no rollout with id '{rollout_id}'")
    if actor.principal.groups is not None:
        groups = await session.scalars(
            select(distinct(Device.group))
            .join(RolloutDevice, RolloutDevice.device_id == Device.id)
            .where(RolloutDevice.rollout_id == rollout_id)
        )
        for group in sorted(groups):
            await actor.check_group(action, group, rollout_id)
    return row


async def _targeted(actor: Actor, session: Session, body: RolloutCreate) -> dict[str, str]:
    """device id → group of every active device the selector matches (scope checked)."""
    selector = body.selector
    query = select(Device.id, Device.group, Device.status)
    if selector.group is not None:
        await actor.check_group("rollout.create", selector.group, None)
        query = query.where(Device.group == selector.group)
    for tag in sorted(set(selector.tags)):
        query = query.where(_tag_like(tag))
    if selector.devices:
        listed = sorted(set(selector.devices))
        rows = list(await session.execute(query.where(Device.id.in_(listed))))
        found = {i: (g, s) for i, g, s in rows}
        known = set(await session.scalars(select(Device.id).where(Device.id.in_(listed))))
        for device_id in listed:
            if device_id not in known:
                raise Problem(404, f"no device with id '{device_id}'")
            if device_id not in found:
                raise Problem(400, f"device '{device_id}' is not in the selector's group or tags")
            group, status = found[device_id]
            await actor.check_group("rollout.create", group, device_id)
            if status != "active":
                raise Problem(409, f"device '{device_id}' is {status}")
        return {i: g for i, (g, _s) in found.items()}
    query = query.where(Device.status == "active")
    if actor.principal.groups is not None:
        query = query.where(Device.group.in_(sorted(actor.principal.groups)))
    rows = list(await session.execute(query.limit(MAX_DEVICES + 1)))
    if len(rows) > MAX_DEVICES:
        raise Problem(400, f"the selector matches more than {MAX_DEVICES} devices")
    return {i: g for i, g, _s in rows}


async def _registered(session: Session, target: str, version: str) -> ModelVersion:
    """The registry's model version for `target`: it must exist, be `version`, and not be
    revoked (a revoked target is out of targets metadata: no device would install it)."""
    row = await session.scalar(select(ModelVersion).where(ModelVersion.target == target))
    if row is None:
        raise Problem(404, f"no registered model has the target '{target}'")
    if row.version != version:
        raise Problem(400, f"target '{target}' is version {row.version}, not {version}")
    if row.revoked_at is not None:
        raise Problem(409, f"target '{target}' is revoked")
    return row


async def _previous(session: Session, body: RolloutCreate, new: ModelVersion) -> TargetRef | None:
    """What a rollback assigns: the one named, else the registered parent of the new model."""
    if body.previous is not None:
        await _registered(session, body.previous.target, body.previous.version)
        return body.previous
    if new.parent_version is not None:
        parent = await find(session, new.name, new.parent_version)
        if parent is not None and parent.revoked_at is None:
            return TargetRef(target=parent.target, version=parent.version)
    if body.on_failure == "rollback":
        raise Problem(
            400,
            f"on_failure rollback needs a previous target: '{body.target}' has no registered, "
            "unrevoked parent; name one in `previous`",
        )
    return None


@router.post("/v1/rollouts", status_code=201, responses=problems(400, 401, 403, 404, 409))
async def create_rollout(
    body: RolloutCreate, actor: Operator, session: Session, request: Request
) -> RolloutPublic:
    """Roll a registered target out to the devices the selector matches, stage by stage; the
    previous target (for a rollback) defaults to the model's registered parent."""
    new = await _registered(session, body.target, body.version)
    previous = await _previous(session, body, new)
    targeted = await _targeted(actor, session, body)
    if not targeted:
        raise Problem(400, "the selector matches no active device the caller reaches")
    ids = sorted(targeted)
    for start in range(0, len(ids), CHUNK):  # bound parameters per statement
        busy = (
            await session.execute(
                select(RolloutDevice.device_id, RolloutDevice.rollout_id)
                .where(RolloutDevice.active_device_id.in_(ids[start : start + CHUNK]))
                .limit(1)
            )
        ).first()
        if busy is not None:
            raise Problem(409, f"device '{busy[0]}' is already in active rollout '{busy[1]}'")
    now = time.time()
    rollout_id = _new_id(now)
    plan = [Stage(s.percent, s.count, s.require_approval) for s in body.stages]
    stages = [
        {"percent": s.percent, "count": s.count, "require_approval": s.require_approval}
        for s in plan
    ]
    strangers = [d for d in body.canaries if d not in targeted]
    if strangers:
        raise Problem(400, f"canary device '{strangers[0]}' is not among the targeted devices")
    members = membership(rollout_id, targeted, plan, body.canaries)
    if not members:  # pragma: no cover - every stage holds at least one device
        raise Problem(400, "no stage holds any device")
    row = Rollout(
        id=rollout_id,
        target=body.target,
        version=body.version,
        previous_target=previous.target if previous else None,
        previous_version=previous.version if previous else None,
        selector=body.selector.model_dump(),
        stages=stages,
        criteria=body.criteria.model_dump(),
        on_failure=body.on_failure,
        status="running",
        stage=-1,
        approved_through=-1,
        accepted_through=-1,
        reasons=[],
        history=[{"at": now, "event": "create", "by": actor.principal.actor}],
        event_cursor=now,
        created_at=now,
        created_by=actor.principal.actor,
        updated_at=now,
    )
    session.add(row)
    await session.flush()
    await session.execute(
        insert(RolloutDevice),
        [
            {
                "rollout_id": rollout_id,
                "device_id": device_id,
                "stage": stage,
                "state": "pending",
                "active_device_id": device_id,
                "progressed": False,
                "figures": {},
            }
            for device_id, stage in sorted(members.items())
        ],
    )
    sizes = stage_sizes(plan, len(targeted))
    actor.audit(
        session,
        "rollout.create",
        rollout_id,
        model_target=body.target,
        version=body.version,
        devices=len(members),
        stage_sizes=list(sizes),
        on_failure=body.on_failure,
    )
    try:
        await session.commit()
    except IntegrityError as exc:  # another rollout took one of the devices meanwhile
        await session.rollback()
        raise Problem(409, "a targeted device joined another active rollout meanwhile") from exc
    _wake(request)
    return await _public(session, row)


@router.get("/v1/rollouts", responses=problems(401, 403))
async def list_rollouts(
    actor: Viewer,
    session: Session,
    status: Status | None = None,
    cursor: RolloutCursor = None,
    limit: Limit = 100,
) -> Page[RolloutPublic]:
    """Rollouts the caller's scope reaches (every device of theirs), newest first."""
    query = select(Rollout).order_by(Rollout.id.desc()).limit(limit + 1)
    if status is not None:
        query = query.where(Rollout.status == status)
    if cursor is not None:
        query = query.where(Rollout.id < cursor)
    if actor.principal.groups is not None:
        outside = (
            select(RolloutDevice.rollout_id)
            .join(Device, Device.id == RolloutDevice.device_id)
            .where(Device.group.not_in(sorted(actor.principal.groups)))
        )
        query = query.where(Rollout.id.not_in(outside))
    rows = list(await session.scalars(query))
    shown = {p.id: p for p in await _publics(session, rows[:limit])}
    return page_of(rows, limit, lambda r: shown[r.id], lambda r: r.id)


@router.get("/v1/rollouts/{rollout_id}", responses=problems(401, 403, 404))
async def get_rollout(rollout_id: RolloutIdPath, actor: Viewer, session: Session) -> RolloutPublic:
    """The rollout: current stage, its devices by state and stage, why it waits or stopped."""
    return await _public(session, await _in_scope(actor, session, rollout_id, "rollout.read"))


@router.get("/v1/rollouts/{rollout_id}/devices", responses=problems(401, 403, 404))
async def rollout_devices(
    rollout_id: RolloutIdPath,
    actor: Viewer,
    session: Session,
    state: DeviceState | None = None,
    stage: Annotated[int, Query(ge=1, le=20)] | None = None,
    cursor: DeviceCursor = None,
    limit: Limit = 100,
) -> Page[RolloutDevicePublic]:
    """The rollout's devices by id: stage, state, the last report and why one failed."""
    await _in_scope(actor, session, rollout_id, "rollout.read")
    query = (
        select(RolloutDevice)
        .where(RolloutDevice.rollout_id == rollout_id)
        .order_by(RolloutDevice.device_id)
        .limit(limit + 1)
    )
    if state is not None:
        query = query.where(RolloutDevice.state == state)
    if stage is not None:
        query = query.where(RolloutDevice.stage == stage - 1)
    if cursor is not None:
        query = query.where(RolloutDevice.device_id > cursor)
    rows = list(await session.scalars(query))
    return page_of(
        rows,
        limit,
        lambda r: RolloutDevicePublic(
            device_id=r.device_id,
            stage=r.stage + 1,
            state=r.state,  # type: ignore[arg-type]
            assigned_at=r.assigned_at,
            updated_at=r.updated_at,
            last_event=r.last_event,
            reason=r.reason,
            figures=dict(r.figures or {}),
        ),
        lambda r: r.device_id,
    )


async def _act(
    rollout_id: str,
    action: str,
    allowed: tuple[str, ...],
    actor: Actor,
    session: Session,
    request: Request,
) -> RolloutPublic:
    """The operator's action, applied to the rollout as it is now: if the engine (or another
    replica) changed the row meanwhile, the action is tried again on the new state."""
    attempt = 1
    while True:
        try:
            return await _act_once(rollout_id, action, allowed, actor, session, request)
        except StaleDataError as exc:
            await session.rollback()
            if attempt == ACT_ATTEMPTS:
                raise Problem(409, _CONFLICT) from exc
            attempt += 1


async def _act_once(
    rollout_id: str,
    action: str,
    allowed: tuple[str, ...],
    actor: Actor,
    session: Session,
    request: Request,
) -> RolloutPublic:
    row = await _in_scope(actor, session, rollout_id, f"rollout.{action}")
    if row.status not in allowed:
        raise Problem(409, f"rollout '{rollout_id}' is {row.status}; cannot {action} it")
    now = time.time()
    detail: dict[str, Any] = {"stage": row.stage + 1, "previous_status": row.status}
    if action == "approve":
        row.approved_through = row.stage + 1
        row.status = "running"
        detail["approved_stage"] = row.stage + 2
    elif action == "pause":
        row.status = "paused"
        row.reasons = [f"paused by {actor.principal.actor}"]
    elif action == "resume":
        pauses = [h for h in row.history if h.get("event") == "pause"]
        if pauses and pauses[-1].get("by") == "system":  # the operator accepts the stage
            row.accepted_through = max(row.accepted_through, row.stage)
            detail["accepted_stage"] = row.stage + 1
        row.status = "running"
        row.reasons = []
    else:  # abort
        row.status = "aborted"
        row.finished_at = now
        row.reasons = [f"aborted by {actor.principal.actor}"]
    row.updated_at = now
    row.history = [
        *row.history,
        {"at": now, "event": action, "by": actor.principal.actor, "stage": row.stage + 1},
    ]
    actor.audit(session, f"rollout.{action}", rollout_id, **detail)
    if action == "abort":
        await release(session, rollout_id)  # flushes the row: a conflict shows here or below
    await session.commit()
    _wake(request)
    return await _public(session, row)


_ACTION_PROBLEMS = problems(401, 403, 404, 409)


@router.post("/v1/rollouts/{rollout_id}/approve", responses=_ACTION_PROBLEMS)
async def approve_rollout(
    rollout_id: RolloutIdPath, actor: Operator, session: Session, request: Request
) -> RolloutPublic:
    """Let the stage that waits for approval start."""
    return await _act(rollout_id, "approve", ("awaiting_approval",), actor, session, request)


@router.post("/v1/rollouts/{rollout_id}/pause", responses=_ACTION_PROBLEMS)
async def pause_rollout(
    rollout_id: RolloutIdPath, actor: Operator, session: Session, request: Request
) -> RolloutPublic:
    """Stop advancing: no new devices are assigned; those assigned keep their assignment."""
    return await _act(
        rollout_id, "pause", ("running", "awaiting_approval"), actor, session, request
    )


@router.post("/v1/rollouts/{rollout_id}/resume", responses=_ACTION_PROBLEMS)
async def resume_rollout(
    rollout_id: RolloutIdPath, actor: Operator, session: Session, request: Request
) -> RolloutPublic:
    """Go on after a pause; after an automatic pause the operator accepts the current stage's
    outcome as it stands and the next stage may start."""
    return await _act(rollout_id, "resume", ("paused",), actor, session, request)


@router.post("/v1/rollouts/{rollout_id}/abort", responses=_ACTION_PROBLEMS)
async def abort_rollout(
    rollout_id: RolloutIdPath, actor: Operator, session: Session, request: Request
) -> RolloutPublic:
    """Stop for good: nothing more is assigned, the devices stop being answered and may join
    another rollout."""
    return await _act(rollout_id, "abort", tuple(sorted(ACTIVE)), actor, session, request)


@router.get(
    "/v1/device/self/update",
    tags=["device API"],
    response_model=UpdateAssignment,
    responses={204: {"description": "nothing assigned"}, **problems(401)},
)
async def device_update(device: CurrentDevice, session: Session) -> UpdateAssignment | Response:
    """What the calling device should install (device token): 200 with the rollout, target
    and version, or 204 when no active rollout assigns it anything."""
    found = (
        await session.execute(
            select(RolloutDevice.state, Rollout)
            .join(Rollout, Rollout.id == RolloutDevice.rollout_id)
            .where(RolloutDevice.active_device_id == device.id)
        )
    ).first()
    if found is not None:
        state, row = found
        if row.status in ACTIVE and state in FORWARD:
            return UpdateAssignment(rollout=row.id, target=row.target, version=row.version)
        if (
            row.status in ACTIVE
            and state in REVERT
            and row.previous_target is not None
            and row.previous_version is not None
        ):
            return UpdateAssignment(
                rollout=row.id, target=row.previous_target, version=row.previous_version
            )
    return Response(status_code=204)
