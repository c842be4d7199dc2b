"""Operator API tokens (admin only): create, list, revoke."""

from __future__ import annotations

import time
import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Response
from sqlalchemy import select

from control_plane.api.deps import Admin, Session
from control_plane.api.problems import Problem, problems
from control_plane.api.schemas import (
    Page,
    TokenCreate,
    TokenCreated,
    TokenIdPath,
    TokenPublic,
    page_of,
)
from control_plane.auth import hash_secret, new_secret
from control_plane.db.models import OperatorToken

router = APIRouter(prefix="/v1/tokens", tags=["tokens"])
Limit = Annotated[int, Query(ge=1, le=1000)]
TokenCursor = Annotated[str | None, Query(pattern=r"^[0-9a-f]{32}$")]


def _public(token: OperatorToken) -> TokenPublic:
    return TokenPublic.model_validate(token, from_attributes=True)


@router.post("", status_code=201, responses=problems(401, 403))
async def create_token(body: TokenCreate, actor: Admin, session: Session) -> TokenCreated:
    """Issue an operator token; the secret is in this response only."""
    now = time.time()
    secret = new_secret("edcp")
    token = OperatorToken(
        id=uuid.uuid4().hex,
        name=body.name,
        token_hash=hash_secret(secret),
        role=body.role,
        groups=sorted(set(body.groups)) if body.groups is not None else None,
        created_at=now,
        created_by=actor.principal.token_id,
        expires_at=now + body.expires_in_s if body.expires_in_s else None,
    )
    session.add(token)
    actor.audit(
        session, "token.create", token.id, name=body.name, role=body.role, groups=token.groups
    )
    await session.commit()
    return TokenCreated(**_public(token).model_dump(), token=secret)


@router.get("", responses=problems(401, 403))
async def list_tokens(
    _actor: Admin, session: Session, cursor: TokenCursor = None, limit: Limit = 100
) -> Page[TokenPublic]:
    """Every token (never its secret), oldest first."""
    query = select(OperatorToken).order_by(OperatorToken.id).limit(limit + 1)
    if cursor is not None:
        query = query.where(OperatorToken.id > cursor)
    rows = list(await session.scalars(query))
    return page_of(rows, limit, _public, lambda t: t.id)


@router.delete("/{token_id}", status_code=204, responses=problems(401, 403, 404))
async def revoke_token(token_id: TokenIdPath, actor: Admin, session: Session) -> Response:
    """Revoke a token: it answers 401 from the next request on to this replica, and within
    `token_cache_s` (2 s by default) to every other."""
    token = await session.get(OperatorToken, token_id)
    if token is None:
        raise Problem(404, f"no token with id '{token_id}'")
    if token.revoked_at is None:
        token.revoked_at = time.time()
        actor.audit(session, "token.revoke", token_id, name=token.name)
        await session.commit()
    actor.state.tokens.evict(token_id)
    return Response(status_code=204)
