"""Request dependencies as `Annotated` aliases: a database session, the calling operator, the
role a route needs (`Actor` with `Need(Role.operator)`), and the calling device.

Every denial (missing role, group out of scope) is written to the audit log in its own
transaction before the 403 goes out; successful mutations add their audit entry to the route's
own transaction, so the change and its record commit together; any other refusal of a
mutating call is audited by the error handlers (problems.py)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.api.problems import Problem
from control_plane.auth import Principal, Role, hash_secret
from control_plane.db.models import AuditEntry, Device, OperatorToken
from control_plane.state import ControlPlaneState

__all__ = [
    "Actor",
    "Admin",
    "CurrentDevice",
    "Need",
    "Operator",
    "Session",
    "State",
    "Viewer",
    "too_many",
]

_bearer = HTTPBearer(auto_error=False, description="An operator API token: `Bearer edcp_...`")
_device_bearer = HTTPBearer(
    auto_error=False, scheme_name="DeviceToken", description="A device API token: `eddev_...`"
)
_CHALLENGE = {"WWW-Authenticate": "Bearer"}
_READS = frozenset({"GET", "HEAD"})


# async: FastAPI runs a plain `def` dependency on a worker thread, a thread hop per request
async def _state(request: Request) -> ControlPlaneState:
    state: ControlPlaneState = request.app.state.cp
    return state


State = Annotated[ControlPlaneState, Depends(_state)]


async def _session(request: Request, state: State) -> AsyncIterator[AsyncSession]:
    """GET and HEAD routes only read: their statements run in autocommit."""
    async with state.db.session(read_only=request.method in _READS) as session:
        yield session


Session = Annotated[AsyncSession, Depends(_session)]


def _source(request: Request) -> str | None:
    return request.client.host if request.client else None


def too_many(wait_s: int, what: str, source: str | None) -> Problem:
    return Problem(
        429,
        f"too many {what} from {source or 'this address'}: try again in {wait_s} s",
        headers={"Retry-After": str(wait_s)},
    )


def _refused_token(state: ControlPlaneState, source: str | None, detail: str) -> Problem:
    """A token that does not check out: counted against its source address."""
    state.limits.auth_failed(source)
    return Problem(401, detail, headers=_CHALLENGE)


def _check_not_locked_out(state: ControlPlaneState, source: str | None) -> None:
    wait = state.limits.auth_wait(source)
    if wait is not None:
        raise too_many(wait, "failed token checks", source)


async def _principal(
    request: Request,
    state: State,
    session: Session,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    if credentials is None:
        raise Problem(
            401,
            "this route needs an operator API token (Authorization: Bearer)",
            headers=_CHALLENGE,
        )
    source = _source(request)
    _check_not_locked_out(state, source)
    token_hash, now = hash_secret(credentials.credentials), time.time()
    cached = state.tokens.get(token_hash, now)
    if cached is None:
        token = await session.scalar(
            select(OperatorToken).where(OperatorToken.token_hash == token_hash)
        )
        if token is None or token.revoked_at is not None:
            raise _refused_token(state, source, "the API token is unknown or revoked")
        groups = frozenset(token.groups) if token.groups is not None else None
        cached = Principal(token.id, token.name, Role[token.role], groups), token.expires_at
        state.tokens.put(token_hash, *cached, now)
    principal, expires_at = cached
    if expires_at is not None and expires_at <= now:
        raise _refused_token(state, source, "the API token has expired")
    request.state.principal = principal  # for the audit of a refusal (problems.py)
    return principal


@dataclass(slots=True)
class Actor:
    """The authorised caller of a route, with the means to audit and to scope."""

    principal: Principal
    state: ControlPlaneState
    source: str | None
    route: str

    def audit(self, session: AsyncSession, action: str, target: str | None, **detail: Any) -> None:
        """Record a successful mutation in the route's own transaction."""
        session.add(self._entry(action, target, "ok", detail))

    async def deny(
        self, action: str, target: str | None, reason: str, *, why: str = "role"
    ) -> Problem:
        """Audit a refusal (`why`: role or scope) in its own transaction; the caller raises
        what this returns."""
        async with self.state.db.session() as session:
            session.add(self._entry(action, target, "denied", {"reason": reason}))
            await session.commit()
        self.state.metrics.denied.labels(reason=why).inc()
        return Problem(403, reason)

    async def group_filter(self, column: Any, group: str | None, action: str) -> Any:
        """A list's WHERE clause on a group `column`: the asked `group` (403, audited, out of
        scope), else the groups the scope reaches; None for every group."""
        if group is not None:
            await self.check_group(action, group, None)
            return column == group
        if self.principal.groups is not None:
            return column.in_(sorted(self.principal.groups))
        return None

    async def check_group(self, action: str, group: str, target: str | None) -> None:
        if not self.principal.reaches(group):
            raise await self.deny(
                action,
                target,
                f"token '{self.principal.name}' does not reach group '{group}'",
                why="scope",
            )

    def _entry(self, action: str, target: str | None, outcome: str, detail: Any) -> AuditEntry:
        return AuditEntry(
            at=time.time(),
            actor=self.principal.actor,
            role=self.principal.role.name,
            action=action,
            target=target,
            outcome=outcome,
            source=self.source,
            detail={"route": self.route, **detail},
        )


class Need:
    """Dependency: the caller must hold at least `role`; else a 403 that is audited."""

    def __init__(self, role: Role) -> None:
        self.role = role

    async def __call__(
        self,
        request: Request,
        state: State,
        principal: Annotated[Principal, Depends(_principal)],
    ) -> Actor:
        route = f"{request.method} {request.url.path}"
        actor = Actor(principal, state, _source(request), route)
        if not principal.has(self.role):
            raise await actor.deny(
                route,
                None,
                f"role '{principal.role.name}' may not do this; it needs '{self.role.name}'",
            )
        if self.role is Role.admin and principal.groups is not None:
            raise await actor.deny(
                route,
                None,
                f"token '{principal.name}' is scoped to groups {sorted(principal.groups)}: "
                "admin actions are fleet-wide and need a token without groups",
                why="scope",
            )
        return actor


Viewer = Annotated[Actor, Depends(Need(Role.viewer))]
Operator = Annotated[Actor, Depends(Need(Role.operator))]
Admin = Annotated[Actor, Depends(Need(Role.admin))]


async def _device(
    request: Request,
    state: State,
    session: Session,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_device_bearer)],
) -> Device:
    if credentials is None:
        raise Problem(
            401, "this route needs a device API token (Authorization: Bearer)", headers=_CHALLENGE
        )
    source = _source(request)
    _check_not_locked_out(state, source)
    device = await session.scalar(
        select(Device).where(Device.api_token_hash == hash_secret(credentials.credentials))
    )
    if device is None or device.status == "decommissioned":
        raise _refused_token(
            state, source, "the device token is unknown or its device is decommissioned"
        )
    request.state.device_id = device.id  # for the audit of a refusal (problems.py)
    return device


CurrentDevice = Annotated[Device, Depends(_device)]
