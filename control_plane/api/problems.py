"""Errors as RFC 9457 `application/problem+json`: one `Problem` exception the routes raise,
handlers that turn it (and FastAPI's validation and HTTP errors) into problem documents, and
`problems(...)` to declare the error responses of a route in the OpenAPI document.

The handlers also put every refused mutating call (POST, PUT, PATCH, DELETE answered 4xx or
5xx) in the audit log, with the caller as far as it is known (an operator, a device, or
anonymous), in a transaction of its own. Two kinds are left to others: 403s, audited by the
role and scope checks themselves, and 429s, which answer a flood and would be one."""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = [
    "Problem",
    "ProblemDocument",
    "audit_refusal",
    "install_handlers",
    "problem_response",
    "problems",
]

log = logging.getLogger("control_plane.api")
MEDIA_TYPE = "application/problem+json"
TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    410: "Gone",
    413: "Payload too large",
    422: "Unprocessable content",
    429: "Too many requests",
    500: "Internal server error",
    502: "Bad gateway",
    503: "Service unavailable",
}


class ProblemDocument(BaseModel):
    type: str = "about:blank"
    title: str
    status: int
    detail: str


class Problem(Exception):
    """An error answered as a problem document; `detail` is one sentence for the operator."""

    def __init__(self, status: int, detail: str, *, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


def problem_response(
    status: int, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = ProblemDocument(title=TITLES.get(status, "Error"), status=status, detail=detail)
    return JSONResponse(body.model_dump(), status, headers=headers, media_type=MEDIA_TYPE)


def _validation_sentence(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "the request is not valid"
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    message = str(first.get("msg", "is not valid")).removeprefix("Value error, ")
    return f"{where}: {message[:1].lower()}{message[1:]}"


_MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_AUDITED_ELSEWHERE = frozenset({403, 429})


async def audit_refusal(request: Request, status: int, detail: str) -> None:
    """One audit entry for a refused mutating call (module docstring); never raises."""
    if request.method not in _MUTATING or status in _AUDITED_ELSEWHERE:
        return
    state = getattr(request.app.state, "cp", None)
    if state is None:
        return
    from control_plane.db.models import AuditEntry

    principal = getattr(request.state, "principal", None)
    device = getattr(request.state, "device_id", None)
    actor = principal.actor if principal else f"device {device}" if device else "anonymous"
    route = request.scope.get("route")
    template = getattr(route, "path", None) or request.url.path
    entry = AuditEntry(
        at=time.time(),
        actor=actor[:160],
        role=principal.role.name if principal else None,
        action=f"{request.method} {template}"[:64],
        target=request.url.path[:200],
        outcome="refused" if status < 500 else "failed",
        source=(request.client.host if request.client else None),
        detail={"status": status, "reason": detail[:500]},
    )
    try:
        async with state.db.session() as session:
            session.add(entry)
            await session.commit()
    except Exception:  # the answer goes out all the same
        log.exception("the refusal of %s %s was not audited", request.method, request.url.path)


def install_handlers(app: FastAPI) -> None:
    async def on_problem(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, Problem)
        await audit_refusal(request, exc.status, exc.detail)
        return problem_response(exc.status, exc.detail, exc.headers)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        sentence = _validation_sentence(exc)
        await audit_refusal(request, 422, sentence)
        return problem_response(422, sentence)

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        await audit_refusal(request, exc.status_code, str(exc.detail))
        return problem_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        await audit_refusal(request, 500, f"unhandled {type(exc).__name__}; see the log")
        return problem_response(500, "the server failed to handle the request; see its log")

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_error)


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error responses a route can give. Always added: 422 for a
    request that breaks the schema (a body that is not JSON included), 400, which routes
    raise for what the schema cannot say, and 413 for a body over max_request_bytes
    (app.BodyLimit); a route that checks a token (401) also answers 429 to an address over
    its failed token checks."""
    throttled = {429} if 401 in statuses else set()
    return {
        status: {
            "model": ProblemDocument,
            "description": TITLES.get(status, "Error"),
            "content": {MEDIA_TYPE: {}},
        }
        for status in sorted({*statuses, *throttled, 400, 413, 422})
    }
