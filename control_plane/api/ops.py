"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from control_plane.api.deps import State
from control_plane.api.problems import Problem, problems

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up and serving HTTP."""
    return {"status": "ok"}


@router.get("/readyz", responses=problems(503))
async def readyz(state: State) -> dict[str, object]:
    """Ready for traffic: the database answers and ingest (when enabled) is connected."""
    try:
        async with state.db.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    except Exception as exc:
        raise Problem(503, f"the database does not answer: {type(exc).__name__}") from exc
    ingest = state.ingest
    if ingest is not None and not ingest.connected:
        raise Problem(503, "ingest is not connected to the broker")
    return {
        "status": "ready",
        "database": state.db.dialect,
        "ingest": "connected" if ingest is not None else "disabled",
    }


@router.get(
    "/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}}
)
async def metrics(state: State) -> Response:
    """Prometheus text exposition of the API and ingest counters."""
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
