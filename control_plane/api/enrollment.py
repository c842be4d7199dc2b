"""Device enrollment: operators issue one-time, expiring tokens; a device redeems one with
its new public key and a proof of possession, and receives its id, its API token and broker
credentials that reach only its own topics, and the update repository's trusted root."""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from control_plane.api.deps import Operator, Session, State, Viewer, too_many
from control_plane.api.problems import Problem, problems
from control_plane.api.schemas import (
    BrokerCredentials,
    EnrollmentState,
    EnrollmentTokenCreate,
    EnrollmentTokenCreated,
    EnrollmentTokenPublic,
    EnrollRequest,
    EnrollResponse,
    GroupQuery,
    Page,
    TokenIdPath,
    page_of,
)
from control_plane.auth import hash_secret, new_secret
from control_plane.db.models import AuditEntry, Device, EnrollmentToken
from control_plane.errors import ControlPlaneError
from control_plane.repository import current_root
from edged_formats.enrollment import verify_possession
from edged_formats.errors import SignatureError

router = APIRouter(tags=["enrollment"])
Limit = Annotated[int, Query(ge=1, le=1000)]
TokenCursor = Annotated[str | None, Query(pattern=r"^[0-9a-f]{32}$")]
log = logging.getLogger("control_plane.enrollment")


def device_id_for(public_key: bytes) -> str:
    """`dev-` + the key id, the same name the device derives for itself."""
    return "dev-" + hashlib.sha256(public_key).hexdigest()[:16]


@router.post("/v1/enrollment-tokens", status_code=201, responses=problems(401, 403))
async def create_enrollment_token(
    body: EnrollmentTokenCreate, actor: Operator, state: State, session: Session
) -> EnrollmentTokenCreated:
    """A one-time token a device redeems at `POST /v1/enroll` before it expires."""
    await actor.check_group("enrollment.create", body.group, None)
    now = time.time()
    secret = new_secret("edenr")
    row = EnrollmentToken(
        id=uuid.uuid4().hex,
        token_hash=hash_secret(secret),
        group=body.group,
        tags=sorted(set(body.tags)),
        created_at=now,
        created_by=actor.principal.token_id,
        expires_at=now + (body.ttl_s or state.settings.enrollment_ttl_s),
    )
    session.add(row)
    actor.audit(session, "enrollment.create", row.id, group=row.group, tags=row.tags)
    await session.commit()
    return EnrollmentTokenCreated(
        id=row.id, token=secret, group=row.group, tags=row.tags, expires_at=row.expires_at
    )


def _token_state(token: EnrollmentToken, now: float) -> EnrollmentState:
    if token.used_at is not None:
        return "used"
    if token.revoked_at is not None:
        return "revoked"
    return "expired" if token.expires_at <= now else "pending"


def _token_public(token: EnrollmentToken, now: float) -> EnrollmentTokenPublic:
    return EnrollmentTokenPublic(
        id=token.id,
        group=token.group,
        tags=list(token.tags),
        created_at=token.created_at,
        created_by=token.created_by,
        expires_at=token.expires_at,
        state=_token_state(token, now),
        used_at=token.used_at,
        device_id=token.device_id,
        revoked_at=token.revoked_at,
        revoked_by=token.revoked_by,
    )


@router.get("/v1/enrollment-tokens", responses=problems(401, 403))
async def list_enrollment_tokens(
    actor: Viewer,
    session: Session,
    group: GroupQuery = None,
    cursor: TokenCursor = None,
    limit: Limit = 100,
) -> Page[EnrollmentTokenPublic]:
    """Enrollment tokens the caller's scope reaches (never their secrets), by id, with their
    state: pending, used (and by which device), expired or revoked."""
    query = select(EnrollmentToken).order_by(EnrollmentToken.id).limit(limit + 1)
    in_scope = await actor.group_filter(EnrollmentToken.group, group, "enrollment.list")
    if in_scope is not None:
        query = query.where(in_scope)
    if cursor is not None:
        query = query.where(EnrollmentToken.id > cursor)
    rows = list(await session.scalars(query))
    now = time.time()
    return page_of(rows, limit, lambda t: _token_public(t, now), lambda t: t.id)


@router.delete(
    "/v1/enrollment-tokens/{token_id}", status_code=204, responses=problems(401, 403, 404, 409)
)
async def revoke_enrollment_token(
    token_id: TokenIdPath, actor: Operator, session: Session
) -> Response:
    """Revoke a token not yet used (a leaked one): `POST /v1/enroll` then refuses it with
    410. A used token is a 409: decommission its device instead."""
    token = await session.get(EnrollmentToken, token_id)
    if token is None:
        raise Problem(404, f"no enrollment token with id '{token_id}'")
    await actor.check_group("enrollment.revoke", token.group, token_id)
    if token.used_at is not None:
        raise Problem(409, f"enrollment token '{token_id}' was used by device '{token.device_id}'")
    if token.revoked_at is None:
        token.revoked_at, token.revoked_by = time.time(), actor.principal.token_id
        actor.audit(session, "enrollment.revoke", token_id, group=token.group)
        await session.commit()
    return Response(status_code=204)


@router.post(
    "/v1/enroll",
    status_code=201,
    responses=problems(400, 401, 409, 410, 429, 502),
    openapi_extra={"security": []},
)
async def enroll(
    body: EnrollRequest, request: Request, state: State, session: Session
) -> EnrollResponse:
    """Redeem an enrollment token: no operator token needed, the enrollment token is the
    credential. Refused: unknown, used or expired tokens, a proof that does not verify, a key
    already enrolled; over `enroll_per_minute` from one address, 429."""
    source = request.client.host if request.client else None
    wait = state.limits.enroll_wait(source)
    if wait is not None:
        raise too_many(wait, "enrollment attempts", source)
    public_key = bytes.fromhex(body.public_key)
    try:
        verify_possession(public_key, body.token, bytes.fromhex(body.proof))
    except SignatureError as exc:
        raise Problem(400, str(exc)) from exc
    token = await session.scalar(
        select(EnrollmentToken).where(EnrollmentToken.token_hash == hash_secret(body.token))
    )
    now = time.time()
    if token is None:
        raise Problem(401, "the enrollment token is unknown")
    if token.used_at is not None:
        raise Problem(410, "the enrollment token was already used")
    if token.revoked_at is not None:
        raise Problem(410, "the enrollment token was revoked")
    if token.expires_at <= now:
        raise Problem(410, "the enrollment token has expired")
    device_id = device_id_for(public_key)
    if await session.get(Device, device_id) is not None:
        raise Problem(409, f"this key is already enrolled as device '{device_id}'")
    # One-time: only the request whose UPDATE claims the row goes on.
    claimed = await session.execute(
        update(EnrollmentToken)
        .where(
            EnrollmentToken.id == token.id,
            EnrollmentToken.used_at.is_(None),
            EnrollmentToken.revoked_at.is_(None),
        )
        .values(used_at=now, device_id=device_id)
    )
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        raise Problem(410, "the enrollment token was already used or revoked")
    api_token, password = new_secret("eddev"), secrets.token_urlsafe(32)
    session.add(
        Device(
            id=device_id,
            public_key=body.public_key,
            group=token.group,
            tags=list(token.tags),
            status="active",
            api_token_hash=hash_secret(api_token),
            enrolled_at=now,
            enrollment_id=token.id,
            online=False,
            software_version=body.software_version,
        )
    )
    session.add(
        AuditEntry(
            at=now,
            actor=f"device {device_id}",
            role=None,
            action="device.enroll",
            target=device_id,
            outcome="ok",
            source=request.client.host if request.client else None,
            detail={"enrollment": token.id, "group": token.group},
        )
    )
    try:
        await session.flush()
    except IntegrityError as exc:
        raise Problem(409, f"this key is already enrolled as device '{device_id}'") from exc
    try:
        await state.broker_admin.grant_device(device_id, password)
    except ControlPlaneError as exc:
        log.error("broker refused credentials for %s: %s", device_id, exc)
        raise Problem(502, f"the broker did not accept the device's credentials: {exc}") from exc
    try:
        await session.commit()
    except BaseException:
        await state.broker_admin.revoke_device(device_id)
        raise
    broker = state.device_broker
    root = await current_root(session)
    return EnrollResponse(
        device_id=device_id,
        group=token.group,
        tags=list(token.tags),
        api_token=api_token,
        broker=BrokerCredentials(
            host=broker.host,
            port=broker.port,
            tls=broker.tls,
            username=device_id,
            password=password,
        ),
        root=root.decode("utf-8") if root is not None else None,
    )
