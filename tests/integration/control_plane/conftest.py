"""Fixtures for the control plane against real parts: a dynamic-security Mosquitto, a real
`edged-control-plane serve` process, and both SQL backends (a SQLite file; a PostgreSQL
database created for the module and dropped afterwards). PostgreSQL is at 127.0.0.1:5432 on
this machine and CI's; without it the PostgreSQL half is skipped with the reason printed,
except under CI, where it fails."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator

import pytest

from control_plane.local_broker import DynsecBootstrap, MosquittoBroker
from tests.support.control_plane import ControlPlaneProcess

PG_ADMIN_URL = os.environ.get("EDGED_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
BROKER_ADMIN = "edged-control-plane"
BROKER_ADMIN_PASSWORD = "test-admin-" + uuid.uuid4().hex


async def _pg(statement: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def _postgres_unavailable() -> str | None:
    try:
        asyncio.run(_pg("SELECT 1"))
    except Exception as exc:  # any failure to reach it is the reason to print
        return f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc!r}"
    return None


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A fresh, empty database of each backend for the module."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('cp-sqlite') / 'cp.db'}"
        return
    reason = _postgres_unavailable()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI must not skip the PostgreSQL tests)")
        pytest.skip(reason)
    name = f"edged_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_pg(f'CREATE DATABASE "{name}"'))
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    try:
        yield f"{base}/{name}"
    finally:
        asyncio.run(_pg(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="module")
def dynsec_mosquitto(
    mosquitto_binary: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MosquittoBroker]:
    """A Mosquitto with the dynamic security plugin: anonymous clients refused."""
    bootstrap = DynsecBootstrap(BROKER_ADMIN, BROKER_ADMIN_PASSWORD)
    with MosquittoBroker(
        binary=mosquitto_binary, workdir=tmp_path_factory.mktemp("dynsec"), dynsec=bootstrap
    ) as broker:
        yield broker


@pytest.fixture(scope="module")
def cp(
    database_url: str, dynsec_mosquitto: MosquittoBroker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ControlPlaneProcess]:
    """A real control plane process on its own port, migrated, with an admin token."""
    workdir = tmp_path_factory.mktemp("cp")
    with ControlPlaneProcess(
        database_url, dynsec_mosquitto, BROKER_ADMIN, BROKER_ADMIN_PASSWORD, workdir
    ) as process:
        yield process


@pytest.fixture
def group() -> str:
    """A device group of this test's own, so tests sharing a control plane stay apart."""
    return f"g-{uuid.uuid4().hex[:10]}"
