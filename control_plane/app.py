"""The FastAPI application: `create_app(settings, broker_admin=..., device_broker=...,
ingest=...)` builds it; its lifespan opens the database (refusing a schema that is not at the
migration head), starts ingest when configured, and closes both at shutdown.

Routes live in control_plane/api/ (thin: checks, one query, one commit); every route's error
responses are declared in the OpenAPI document as `application/problem+json`."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import FastAPI, Request
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from control_plane.api import (
    audit,
    devices,
    enrollment,
    models,
    ops,
    personalisation,
    repository,
    telemetry,
    tokens,
)
from control_plane.api import rollouts as rollout_routes
from control_plane.api.problems import audit_refusal, install_handlers, problem_response
from control_plane.broker_admin import BrokerAdmin
from control_plane.db.engine import Database
from control_plane.ingest import Ingest, IngestConfig
from control_plane.repository import RepositoryStore
from control_plane.rollouts import BrokerLogin, MqttNotifier, RolloutEngine
from control_plane.settings import Settings
from control_plane.state import BrokerEndpoint, ControlPlaneState
from edged_formats import __version__

__all__ = ["create_app"]


class RequestMetrics:
    """Counts every API response by method, route template and status, and times it: a plain
    ASGI middleware (Starlette's BaseHTTPMiddleware costs a task and streams per request)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # unless a response starts

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            metrics = scope["app"].state.cp.metrics
            metrics.requests.labels(scope["method"], path, str(status)).inc()
            metrics.latency.labels(path).observe(time.perf_counter() - started)


class BodyLimit:
    """Request bodies over `max_bytes` are refused (413, a problem document) before anything
    reads them whole, authentication included (`POST /v1/enroll` has none): at once when the
    declared Content-Length is over, else as soon as the streamed bytes are. Bundle uploads
    (`POST /v1/models`) are bounded by max_bundle_bytes instead, where they are read.
    (Starlette's own limit answers a declared length in plain text.)"""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (
            scope["method"] == "POST" and scope["path"].rstrip("/") == "/v1/models"
        ):
            await self.app(scope, receive, send)
            return
        detail = f"the request body is over the {self.max_bytes}-byte limit"
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            request = Request(scope, receive)
            await audit_refusal(request, 413, detail)
            await problem_response(413, detail)(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # FastAPI passes HTTPException on as it is
                    raise HTTPException(413, detail)
            return message

        await self.app(scope, counted, send)


def create_app(
    settings: Settings,
    *,
    broker_admin: BrokerAdmin,
    device_broker: BrokerEndpoint,
    ingest: IngestConfig | None = None,
    notify: BrokerLogin | None = None,
) -> FastAPI:
    """The app; `ingest` None runs the API without consuming the broker; `notify` is the
    login commands to devices (rollout notices, personalisation) go out on (default: ingest's;
    neither: devices rely on their poll)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = Database(settings.database_url)
        state = ControlPlaneState(settings, db, broker_admin, device_broker)
        app.state.cp = state
        async with AsyncExitStack() as stack:
            stack.push_async_callback(db.close)
            await db.check_schema()
            app.state.repository = await stack.enter_async_context(
                RepositoryStore(settings, db).running()
            )
            if ingest is not None:
                state.ingest = await stack.enter_async_context(Ingest(ingest, db, state.metrics))
            login = notify or ingest
            notifier = MqttNotifier(login) if login is not None else None
            if notifier is not None:
                await stack.enter_async_context(notifier)
            app.state.notifier = notifier
            app.state.rollouts = await stack.enter_async_context(
                RolloutEngine(db, settings, notifier=notifier)
            )
            yield

    app = FastAPI(
        title="edged control plane",
        version=__version__,
        summary="Fleet API: enrollment, device registry, telemetry, audit.",
        lifespan=lifespan,
    )
    install_handlers(app)
    for module in (tokens, enrollment, devices, telemetry, audit, ops):
        app.include_router(module.router)
    app.include_router(rollout_routes.router)
    app.include_router(personalisation.router)
    app.include_router(models.router)
    app.include_router(repository.router)

    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(RequestMetrics)
    return app
