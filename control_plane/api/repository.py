"""The update repository over HTTP: metadata and artifacts for devices (and operators), root
metadata signed offline, offline targets signatures, and the repository's status.

`GET /v1/repository/metadata/<file>` and `GET /v1/repository/targets/<path>` serve the
consistent-snapshot layout of docs/ota.md: versioned files never change, so they are sent
`immutable` with their sha256 as ETag; `timestamp.json` is `no-cache`. Artifacts go through
Starlette's FileResponse, which answers Range requests with 206 (and multipart ranges). The
Range header is checked here first, so what FileResponse would answer in plain text is a
problem document: a header that is not `bytes=` ranges is 400, a range starting past the end
416, naming the file's size."""

from __future__ import annotations

import re
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import FileResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select

from control_plane.api.deps import Actor, Admin, Operator, Session, Viewer
from control_plane.api.problems import Problem, problems
from control_plane.api.schemas import (
    MetadataFilePath,
    PendingTargetsPublic,
    RepositoryStatus,
    RoleStatus,
    TargetPath,
    TargetsSignatures,
)
from control_plane.auth import hash_secret
from control_plane.db.models import (
    AuditEntry,
    Device,
    OperatorToken,
    PendingTargets,
    RepositoryMetadata,
)
from control_plane.repository import RepositoryError, RepositoryStore, RootRefused, Transaction
from control_plane.signing_keys import role_signers

router = APIRouter(prefix="/v1/repository", tags=["update repository"])

MAX_ROOT_BYTES = 512 * 1024
IMMUTABLE = "public, max-age=31536000, immutable"
_reader_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="RepositoryToken",
    description="A device API token (`eddev_...`) or an operator API token (`edcp_...`)",
)
_CHALLENGE = {"WWW-Authenticate": "Bearer"}
_BYTE_RANGES = re.compile(r"^\s*bytes\s*=(.*)$", re.IGNORECASE)
_RANGE_PART = re.compile(r"^\s*([0-9]{0,19})\s*-\s*([0-9]{0,19})\s*$")


def _check_range(header: str, size: int) -> None:
    """A Problem unless `header` is byte ranges (`START-END`, `START-`, `-SUFFIX`) that all
    start inside the `size`-byte file."""
    ranges = _BYTE_RANGES.match(header)
    parts = [p for p in (ranges[1] if ranges else "").split(",") if p.strip() not in ("", "-")]
    if not parts:
        raise Problem(400, f"the Range header {header[:80]!r} is not bytes=START-END[, ...]")
    for part in parts:
        bounds = _RANGE_PART.match(part)
        if bounds is None or not (bounds[1] or bounds[2]):
            raise Problem(400, f"the Range header's {part.strip()[:40]!r} is not START-END")
        if bounds[1] and bounds[2] and int(bounds[1]) > int(bounds[2]):
            raise Problem(400, f"the Range header's {part.strip()!r} ends before it starts")
        start = int(bounds[1]) if bounds[1] else size - int(bounds[2])
        if start >= size:
            raise Problem(
                416,
                f"the range {part.strip()!r} starts past the end of the {size}-byte file",
                headers={"Content-Range": f"bytes */{size}"},
            )


async def _store(request: Request) -> RepositoryStore:  # async: no thread hop
    store: RepositoryStore = request.app.state.repository
    return store


Store = Annotated[RepositoryStore, Depends(_store)]


async def _reader(
    session: Session,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_reader_bearer)],
) -> str:
    """An enrolled device (not decommissioned) or a valid operator token of any role."""
    if credentials is None:
        raise Problem(
            401, "the repository needs a device or operator token (Bearer)", headers=_CHALLENGE
        )
    hashed = hash_secret(credentials.credentials)
    device = await session.scalar(select(Device).where(Device.api_token_hash == hashed))
    if device is not None and device.status != "decommissioned":
        return f"device {device.id}"
    token = await session.scalar(select(OperatorToken).where(OperatorToken.token_hash == hashed))
    if (
        token is not None
        and token.revoked_at is None
        and (token.expires_at is None or token.expires_at > time.time())
    ):
        return token.name
    raise Problem(401, "the token is not a valid device or operator token", headers=_CHALLENGE)


Reader = Annotated[str, Depends(_reader)]


async def read_body(request: Request, cap: int, what: str) -> bytes:
    """The raw request body, refused with 413 as soon as it passes `cap` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise Problem(413, f"the {what} is {declared} bytes, over the {cap}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise Problem(413, f"the {what} is over the {cap}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def _role(row: RepositoryMetadata | None) -> RoleStatus | None:
    if row is None:
        return None
    return RoleStatus(
        version=row.version, expires_at=row.expires_at, sha256=row.sha256, signed_at=row.created_at
    )


async def status_of(store: RepositoryStore, tx: Transaction) -> RepositoryStatus:
    state = await tx.state()
    online: list[str] = []
    if state.rows["root"] is not None:
        root = state.root
        keys = store.keys(root)
        online = [
            role
            for role in ("targets", "snapshot", "timestamp")
            if len(role_signers(root, role, keys)) >= root.roles[role].threshold
        ]
    return RepositoryStatus(
        root=_role(state.rows["root"]),
        targets=_role(state.rows["targets"]),
        snapshot=_role(state.rows["snapshot"]),
        timestamp=_role(state.rows["timestamp"]),
        online_roles=online,
        pending_targets=state.pending.version if state.pending is not None else None,
    )


@router.get("", responses=problems(401, 403, 409))
async def repository_status(_actor: Viewer, store: Store, session: Session) -> RepositoryStatus:
    """The newest version of each role, when it expires, and which roles this server signs."""
    try:
        return await status_of(store, Transaction(store, session))
    except RepositoryError as exc:
        raise Problem(409, str(exc)) from exc


@router.get(
    "/metadata/{file}",
    tags=["device API"],
    response_class=Response,
    responses={200: {"content": {"application/json": {}}}, **problems(401, 404)},
)
async def metadata_file(
    file: MetadataFilePath, _reader: Reader, store: Store, session: Session
) -> Response:
    """A metadata file: `timestamp.json`, or `<version>.<role>.json` for root, snapshot and
    targets (device or operator token)."""
    row = await store.metadata(session, file)
    if row is None:
        raise Problem(404, f"the repository has no metadata file {file}")
    cache = "no-cache" if file == "timestamp.json" else IMMUTABLE
    headers = {"ETag": f'"{row.sha256}"', "Cache-Control": cache}
    return Response(row.data, media_type="application/json", headers=headers)


@router.get(
    "/targets/{path:path}",
    tags=["device API"],
    response_class=Response,
    responses={
        200: {"content": {"application/octet-stream": {}}},
        206: {
            "description": "Partial content (Range)",
            "content": {"application/octet-stream": {}},
        },
        **problems(400, 401, 404, 416),
    },
)
async def target_file(
    path: TargetPath, request: Request, _reader: Reader, store: Store
) -> Response:
    """An artifact or patch by its served name `<dir>/<sha256>.<name>` (device or operator
    token); Range requests are answered with 206."""
    found = store.artifact(path)
    if found is None:
        raise Problem(404, f"the repository has no target file {path}")
    asked = request.headers.get("range")
    if asked is not None:
        _check_range(asked, found.stat().st_size)
    sha = found.name.split(".", 1)[0]
    headers = {"ETag": f'"{sha}"', "Cache-Control": IMMUTABLE}
    return FileResponse(found, media_type="application/octet-stream", headers=headers)


@router.post(
    "/root",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    },
    responses=problems(401, 403, 409, 413),
)
async def install_root(
    request: Request, actor: Admin, store: Store, session: Session
) -> RepositoryStatus:
    """Install root metadata signed offline: version 1 on an empty repository, else N+1 signed
    by a threshold of the current root's root keys and of its own (what devices check). The
    repository is re-signed under it at once."""
    data = await read_body(request, MAX_ROOT_BYTES, "root metadata")

    async def work(tx: Transaction) -> RepositoryStatus:
        root = await tx.install_root(data, time.time())
        actor.audit(tx.session, "repository.root", f"root v{root.version}")
        return await status_of(store, tx)

    try:
        return await store.run(work)
    except RepositoryError as exc:
        await _audit_refusal(actor, store, "repository.root", str(exc))
        raise Problem(400 if isinstance(exc, RootRefused) else 409, str(exc)) from exc


async def _audit_refusal(actor: Actor, store: RepositoryStore, action: str, reason: str) -> None:
    """A refused trust change is recorded too, in its own transaction."""
    async with store.db.session() as session:
        session.add(
            AuditEntry(
                at=time.time(),
                actor=actor.principal.actor,
                role=actor.principal.role.name,
                action=action,
                target=None,
                outcome="refused",
                source=actor.source,
                detail={"route": actor.route, "reason": reason},
            )
        )
        await session.commit()


@router.get("/pending-targets", responses=problems(401, 403, 404, 409))
async def pending_targets(_actor: Operator, store: Store, session: Session) -> PendingTargetsPublic:
    """The targets metadata waiting for offline signatures (`edged-control-plane targets
    sign`), when targets keys are kept off the server."""
    pending = await session.scalar(
        select(PendingTargets).order_by(PendingTargets.version.desc()).limit(1)
    )
    if pending is None:
        raise Problem(404, "no targets metadata is waiting for signatures")
    try:
        root = (await Transaction(store, session).state()).root
    except RepositoryError as exc:
        raise Problem(409, str(exc)) from exc
    return PendingTargetsPublic(
        version=pending.version,
        signed=pending.signed.decode("utf-8"),
        keyids=list(root.roles["targets"].keyids),
        threshold=root.roles["targets"].threshold,
        signed_by=sorted(pending.signatures),
    )


@router.post("/targets/signatures", responses=problems(401, 403, 409))
async def sign_targets(body: TargetsSignatures, actor: Admin, store: Store) -> RepositoryStatus:
    """Signatures made offline over the pending targets; once they reach the threshold the
    targets are published with a new snapshot and timestamp."""
    signatures = {s.keyid: s.sig for s in body.signatures}

    async def work(tx: Transaction) -> RepositoryStatus:
        missing = await tx.add_targets_signatures(body.version, signatures)
        actor.audit(
            tx.session,
            "repository.targets_signature",
            f"targets v{body.version}",
            keyids=sorted(signatures),
            published=missing == 0,
        )
        return await status_of(store, tx)

    try:
        return await store.run(work)
    except RepositoryError as exc:
        await _audit_refusal(actor, store, "repository.targets_signature", str(exc))
        raise Problem(409, str(exc)) from exc
