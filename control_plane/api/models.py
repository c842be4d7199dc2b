"""The model registry over HTTP: upload a bundle (the raw body), list and read versions with
their lineage and patches, revoke a version. Every upload and revocation publishes new signed
targets metadata in the same transaction as its audit entry (control_plane.registry)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from sqlalchemy import select

from control_plane.api.deps import Admin, Operator, Session, State, Viewer
from control_plane.api.problems import Problem, problems
from control_plane.api.repository import Store, read_body
from control_plane.api.schemas import (
    ChannelQuery,
    HardwareQuery,
    LineageEntry,
    ModelCursor,
    ModelDetail,
    ModelNamePath,
    ModelNameQuery,
    ModelPublic,
    ModelVersionPath,
    Page,
    PatchPublic,
    page_of,
)
from control_plane.db.models import ModelVersion
from control_plane.registry import (
    BundleRefused,
    ModelExists,
    ModelNotFound,
    ModelRevoked,
    UploadOptions,
    find,
    hardware_tags,
    lineage,
    revoke,
    upload,
)
from control_plane.repository import RepositoryError

router = APIRouter(prefix="/v1/models", tags=["models"])
Limit = Annotated[int, Query(ge=1, le=1000)]


def public(row: ModelVersion) -> ModelPublic:
    patches = [
        PatchPublic(
            parent_sha256=parent,
            name=str(entry["name"]),
            length=int(entry["length"]),
            sha256=str(entry["hashes"]["sha256"]),
        )
        for parent, entry in sorted(row.patches.items())
    ]
    return ModelPublic(
        name=row.name,
        version=row.version,
        parent_version=row.parent_version,
        target=row.target,
        sha256=row.sha256,
        length=row.length,
        channel=row.channel,
        hardware=list(row.hardware),
        manifest=dict(row.manifest),
        patches=patches,
        uploaded_at=row.uploaded_at,
        uploaded_by=row.uploaded_by,
        revoked_at=row.revoked_at,
        revoked_by=row.revoked_by,
    )


async def detail(session: Session, row: ModelVersion) -> ModelDetail:
    chain = [
        LineageEntry(version=a.version, sha256=a.sha256, revoked=a.revoked_at is not None)
        for a in await lineage(session, row)
    ]
    return ModelDetail(**public(row).model_dump(), lineage=chain)


@router.post(
    "",
    status_code=201,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        }
    },
    responses=problems(401, 403, 409, 413),
)
async def upload_model(
    request: Request,
    actor: Operator,
    state: State,
    store: Store,
    session: Session,
    channel: ChannelQuery = "stable",
    hardware: HardwareQuery = None,
) -> ModelDetail:
    """Upload a bundle (.edb) as the raw request body. It is checked whole before anything is
    kept; a patch from its parent version is made when that is registered; new targets
    metadata lists it. Refused: a bad bundle (400, naming the problem), a name and version
    already registered (409), a body over `max_bundle_bytes` (413)."""
    cap = state.settings.max_bundle_bytes
    data = await read_body(request, cap, "bundle")
    options = UploadOptions(channel=channel, hardware=hardware_tags(hardware))
    try:
        row = await upload(store, data, options, actor.principal.actor, actor.audit, max_bytes=cap)
    except BundleRefused as exc:
        raise Problem(400, str(exc)) from exc
    except ModelExists as exc:
        raise Problem(409, str(exc)) from exc
    except RepositoryError as exc:
        raise Problem(409, f"the model cannot be published: {exc}") from exc
    return await detail(session, row)


@router.get("", responses=problems(401, 403))
async def list_models(
    _actor: Viewer,
    session: Session,
    name: ModelNameQuery = None,
    revoked: bool | None = None,
    cursor: ModelCursor = None,
    limit: Limit = 100,
) -> Page[ModelPublic]:
    """Registered versions in upload order; `name` and `revoked` filter."""
    query = select(ModelVersion).order_by(ModelVersion.id).limit(limit + 1)
    if name is not None:
        query = query.where(ModelVersion.name == name)
    if revoked is not None:
        column = ModelVersion.revoked_at
        query = query.where(column.is_not(None) if revoked else column.is_(None))
    if cursor is not None:
        query = query.where(ModelVersion.id > int(cursor))
    rows = list(await session.scalars(query))
    return page_of(rows, limit, public, lambda r: str(r.id))


@router.get("/{name}/{version}", responses=problems(401, 403, 404))
async def get_model(
    name: ModelNamePath, version: ModelVersionPath, _actor: Viewer, session: Session
) -> ModelDetail:
    """One version with its lineage (registered ancestors) and its patches' sizes."""
    row = await find(session, name, version)
    if row is None:
        raise Problem(404, f"no model {name} {version} in the registry")
    return await detail(session, row)


@router.post("/{name}/{version}/revoke", responses=problems(401, 403, 404, 409))
async def revoke_model(
    name: ModelNamePath, version: ModelVersionPath, actor: Admin, store: Store, session: Session
) -> ModelDetail:
    """Remove a version from targets metadata: devices stop installing it (a rollout back
    to it is no longer possible). The files stay, as every published file does."""
    try:
        row = await revoke(store, name, version, actor.principal.actor, actor.audit)
    except ModelNotFound as exc:
        raise Problem(404, str(exc)) from exc
    except ModelRevoked as exc:
        raise Problem(409, str(exc)) from exc
    except RepositoryError as exc:
        raise Problem(409, f"the revocation cannot be published: {exc}") from exc
    return await detail(session, row)
