"""The service around the routes: OpenAPI completeness, problem documents, health, metrics,
the schema check at start and the command line."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from control_plane.db.engine import Database, head_revision
from tests.support.control_plane import CP, ControlPlaneProcess


def test_openapi_declares_every_route_and_its_errors(cp: ControlPlaneProcess) -> None:
    """Every operation has a summary or description, and every protected one declares 401 and
    403 as problem documents."""
    spec = httpx.get(f"{cp.url}/openapi.json").json()
    operations = [
        (path, method, op) for path, item in spec["paths"].items() for method, op in item.items()
    ]
    assert len(operations) >= 20
    for path, method, op in operations:
        assert op.get("summary") or op.get("description"), f"{method} {path}"
        if path.startswith("/v1/") and path != "/v1/enroll":
            for status in ("401", "422"):
                assert status in op["responses"], f"{method} {path} lacks {status}"
                if status != "422":
                    assert "application/problem+json" in op["responses"][status]["content"]
    assert "403" in spec["paths"]["/v1/devices/{device_id}/decommission"]["post"]["responses"]
    assert "410" in spec["paths"]["/v1/enroll"]["post"]["responses"]


def test_unknown_routes_and_ids_are_problem_documents(cp: ControlPlaneProcess) -> None:
    """404s, whether the route or the device is missing, come as application/problem+json."""
    with cp.api(cp.admin_token) as api:
        missing_device = api.get("/v1/devices/dev-0000000000000000")
        missing_route = api.get("/v1/nothing-here")
        bad_cursor = api.get("/v1/events", params={"cursor": "garbage"})
    assert missing_device.status_code == 404
    assert missing_device.json() == {
        "type": "about:blank",
        "title": "Not found",
        "status": 404,
        "detail": "no device with id 'dev-0000000000000000'",
    }
    assert missing_route.status_code == 404
    assert missing_route.headers["content-type"] == "application/problem+json"
    assert bad_cursor.status_code == 422 and bad_cursor.json()["detail"].startswith("query.cursor")


def test_health_readiness_and_metrics(cp: ControlPlaneProcess) -> None:
    """/healthz and /readyz answer without a token; /metrics counts requests by route."""
    with cp.api() as api:
        assert api.get("/healthz").json() == {"status": "ok"}
        ready = api.get("/readyz").json()
        metrics = api.get("/metrics")
    assert ready["status"] == "ready" and ready["ingest"] == "connected"
    assert ready["database"] in ("sqlite", "postgresql")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'edged_cp_http_requests_total{method="GET",route="/healthz",status="200"}' in (
        metrics.text
    )
    assert "edged_cp_broker_connected 1.0" in metrics.text


def test_serve_refuses_a_database_behind_the_migrations(
    cp: ControlPlaneProcess, tmp_path_factory
) -> None:
    """`serve` on an unmigrated database exits 2 naming the fix; `migrate` brings it to head."""
    url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('fresh') / 'cp.db'}"
    env = {**cp.env, "EDGED_CP_DATABASE_URL": url, "EDGED_CP_PORT": "0"}
    served = subprocess.run(
        [*CP, "serve"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert served.returncode != 0
    assert "run `edged-control-plane migrate`" in served.stderr + served.stdout
    migrated = subprocess.run(
        [*CP, "migrate"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert migrated.returncode == 0 and f"at migration {head_revision()}" in migrated.stdout

    async def revision() -> str | None:
        db = Database(url)
        try:
            return await db.current_revision()
        finally:
            await db.close()

    assert asyncio.run(revision()) == head_revision() == "0006_enrollment_revocation"


def test_bad_settings_exit_with_one_sentence(cp: ControlPlaneProcess) -> None:
    """A malformed setting in the environment is named, exit status 2."""
    env = {**cp.env, "EDGED_CP_DATABASE_URL": "mysql://nope"}
    result = subprocess.run(
        [*CP, "migrate"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "edged-control-plane: database_url: must start with sqlite+aiosqlite:// or "
        "postgresql+asyncpg://"
    )


def test_migrations_match_the_models(cp: ControlPlaneProcess, database_url: str) -> None:
    """Alembic finds nothing to change between the migrated database and the models."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from control_plane.db.models import Base

    async def differences() -> list:
        db = Database(database_url)
        try:
            async with db.engine.connect() as conn:
                return await conn.run_sync(
                    lambda c: compare_metadata(MigrationContext.configure(c), Base.metadata)
                )
        finally:
            await db.close()

    assert asyncio.run(differences()) == []


def test_cursors_out_of_range_are_refused_not_crashed(cp: ControlPlaneProcess) -> None:
    """A cursor with a counter past 2**63 (found by schemathesis) is a 400, not a 500."""
    with cp.api(cp.admin_token) as api:
        huge = api.get("/v1/samples", params={"cursor": "dev-a:1:9312876773375192668"})
        empty = api.get("/v1/events", params={"cursor": ""})
    assert huge.status_code == 400 and "cursor" in huge.json()["detail"]
    assert empty.status_code == 422


def test_the_api_keeps_its_openapi_promises(cp: ControlPlaneProcess, tmp_path: Path) -> None:
    """Schemathesis generates requests from /openapi.json for every route: no 500s, only
    declared status codes, content types, headers and response schemas."""
    import shutil

    binary = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert binary is not None, "schemathesis (dev extra) is not installed"
    checks = (
        "not_a_server_error,status_code_conformance,content_type_conformance,"
        "response_schema_conformance,response_headers_conformance"
    )
    result = subprocess.run(
        [
            binary,
            "run",
            f"{cp.url}/openapi.json",
            "-H",
            f"Authorization: Bearer {cp.admin_token}",
            "--checks",
            checks,
            "--max-examples",
            "20",
            "--seed",
            "1",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
        cwd=tmp_path,  # its cache directory lands here, not in the checkout
    )
    assert result.returncode == 0, result.stdout[-4000:]


def test_lost_database_connections_are_replaced_not_served_as_errors(
    cp: ControlPlaneProcess, database_url: str
) -> None:
    """PostgreSQL ends every connection of the control plane (as a server restart or an
    administrator's pg_terminate_backend does): the pool replaces them, no request fails."""
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite has no server connections to lose")
    import asyncpg

    from tests.integration.control_plane.conftest import PG_ADMIN_URL

    name = database_url.rsplit("/", 1)[1]

    async def terminate() -> int:
        conn = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
        try:
            return len(
                await conn.fetch(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                    name,
                )
            )
        finally:
            await conn.close()

    with cp.api(cp.admin_token) as api:

        def statuses() -> list[int]:
            async def burst() -> list[int]:
                async with httpx.AsyncClient(base_url=cp.url, headers=api.headers) as client:
                    replies = await asyncio.gather(
                        *(client.get("/v1/devices", params={"limit": 5}) for _ in range(12))
                    )
                return [reply.status_code for reply in replies]

            return asyncio.run(burst())

        assert statuses() == [200] * 12  # the pool holds several connections now
        assert asyncio.run(terminate()) >= 2
        time.sleep(0.5)  # the server's goodbye reaches the control plane's sockets
        assert statuses() == [200] * 12
        assert api.get("/readyz").status_code == 200
