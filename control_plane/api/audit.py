"""The append-only audit log, read back (admin): newest first, filterable."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import select

from control_plane.api.deps import Admin, Session
from control_plane.api.problems import problems
from control_plane.api.schemas import AuditPublic, Page, TextQuery, page_of
from control_plane.db.models import AuditEntry

router = APIRouter(tags=["audit"])
Limit = Annotated[int, Query(ge=1, le=1000)]


@router.get("/v1/audit", responses=problems(401, 403))
async def read_audit(
    _actor: Admin,
    session: Session,
    action: TextQuery = None,
    target: TextQuery = None,
    outcome: TextQuery = None,
    cursor: Annotated[int, Query(ge=0, lt=1 << 63)] | None = None,
    limit: Limit = 100,
) -> Page[AuditPublic]:
    """Who did what, when, from where, and whether it was allowed; newest first."""
    query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit + 1)
    if action is not None:
        query = query.where(AuditEntry.action == action)
    if target is not None:
        query = query.where(AuditEntry.target == target)
    if outcome is not None:
        query = query.where(AuditEntry.outcome == outcome)
    if cursor is not None:
        query = query.where(AuditEntry.id < cursor)
    rows = list(await session.scalars(query))
    return page_of(rows, limit, AuditPublic.model_validate, lambda r: str(r.id))
