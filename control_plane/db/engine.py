"""The database handle: an async engine and session factory for SQLite or PostgreSQL, the
Alembic migrations (applied by `edged-control-plane migrate`, checked at start), and the one
idempotent insert both ingest and the API rely on."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DisconnectionError, SQLAlchemyError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from control_plane.errors import ControlPlaneError
from control_plane.json_codec import dumps_json

__all__ = ["Database", "SchemaError"]

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


class SchemaError(ControlPlaneError):
    """The database is unreachable or its schema is not at the code's migration head."""


def alembic_config(connection: Connection | None = None) -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def _refuse_closed(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """Hand out no connection the server has closed (a restart, pg_terminate_backend): the
    pool replaces it. asyncpg sees the close on its socket, so this costs no round trip;
    SQLAlchemy's pool_pre_ping costs three (BEGIN, a ping, ROLLBACK) on every checkout."""
    if dbapi_connection.driver_connection.is_closed():
        raise DisconnectionError("the server closed this connection")


class Database:
    """One engine per process; `session()` for a unit of work."""

    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        self.url = url
        self.dialect = "postgresql" if url.startswith("postgresql") else "sqlite"
        options: dict[str, Any] = {}
        if self.dialect == "postgresql":
            options.update(pool_size=pool_size, max_overflow=pool_size)
        self.engine: AsyncEngine = create_async_engine(url, json_serializer=dumps_json, **options)
        if self.dialect == "sqlite":
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        else:
            event.listen(self.engine.sync_engine.pool, "checkout", _refuse_closed)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        # statements outside a transaction: no BEGIN and ROLLBACK round trips around them
        reader = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        self.readers = async_sessionmaker(reader, expire_on_commit=False)

    @asynccontextmanager
    async def session(self, *, read_only: bool = False) -> AsyncIterator[AsyncSession]:
        """A unit of work; `read_only`: each statement on its own (autocommit), for work
        that only reads. PostgreSQL's READ COMMITTED gives each statement its own snapshot
        either way; SQLite would otherwise keep one across the statements."""
        async with (self.readers if read_only else self.sessions)() as session:
            yield session

    async def migrate(self) -> str | None:
        """Apply every pending migration; the revision the database is at afterwards."""

        def upgrade(connection: Connection) -> None:
            command.upgrade(alembic_config(connection), "head")

        try:
            async with self.engine.begin() as conn:
                await conn.run_sync(upgrade)
        except (SQLAlchemyError, OSError) as exc:
            raise SchemaError(f"cannot migrate {self.safe_url}: {exc}") from exc
        return await self.current_revision()

    async def current_revision(self) -> str | None:
        try:
            async with self.engine.connect() as conn:
                return await conn.run_sync(
                    lambda c: MigrationContext.configure(c).get_current_revision()
                )
        except (SQLAlchemyError, OSError) as exc:
            raise SchemaError(f"cannot reach the database {self.safe_url}: {exc}") from exc

    async def check_schema(self) -> None:
        """Refuse to serve on a database that is not at the code's migration head."""
        current, head = await self.current_revision(), head_revision()
        if current != head:
            raise SchemaError(
                f"database {self.safe_url} is at migration {current or 'none'}, the code needs "
                f"{head}; run `edged-control-plane migrate`"
            )

    @property
    def safe_url(self) -> str:
        """The URL without its password, for messages and logs."""
        return self.engine.url.render_as_string(hide_password=True)

    async def close(self) -> None:
        await self.engine.dispose()
