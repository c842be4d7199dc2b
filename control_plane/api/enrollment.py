"""Device enrollment: operators issue one-time, expiring tokens; a device redeems one with
its new public key and a proof of possession, and receives its id, its API token and broker
credentials that reach only its own topics, and the update repository's trusted root."""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
import uuid

from fastapi import APIRouter, Request
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from control_plane.api.deps import Operator, Session, State, too_many
from control_plane.api.problems import Problem, problems
from control_plane.api.schemas import (
    BrokerCredentials,
    EnrollmentTokenCreate,
    EnrollmentTokenCreated,
    EnrollRequest,
    EnrollResponse,
)
from control_plane.auth import hash_secret, new_secret
from control_plane.db.models import AuditEntry, Device, EnrollmentToken
from control_plane.errors import ControlPlaneError
from control_plane.repository import current_root
from edged_formats.enrollment import verify_possession
from edged_formats.errors import SignatureError

router = APIRouter(tags=["enrollment"])
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
    if token.expires_at <= now:
        raise Problem(410, "the enrollment token has expired")
    device_id = device_id_for(public_key)
    if await session.get(Device, device_id) is not None:
        raise Problem(409, f"this key is already enrolled as device '{device_id}'")
    # One-time: only the request whose UPDATE claims the row goes on.
    claimed = await session.execute(
        update(EnrollmentToken)
        .where(EnrollmentToken.id == token.id, EnrollmentToken.used_at.is_(None))
        .values(used_at=now, device_id=device_id)
    )
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        raise Problem(410, "the enrollment token was already used")
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
