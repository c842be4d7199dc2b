"""deploy/make-secrets and the database password path: the secrets it makes are the ones the
compose file mounts, and the replicas' database URL (no password in it) makes SQLAlchemy's
asyncpg send the password from the passfile secret, checked against a PostgreSQL simulator
that asks for a cleartext password and records what it gets."""

from __future__ import annotations

import asyncio
import struct
import subprocess
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from tests.deploy import deploy_files as files

SSL_REQUEST = 80877103
PROTOCOL_3 = 196608


def _make_secrets(directory: Path) -> None:
    subprocess.run(
        ["bash", str(files.DEPLOY / "make-secrets"), str(directory)],
        check=True,
        capture_output=True,
    )


def test_make_secrets_makes_what_compose_mounts(tmp_path: Path) -> None:
    """One file per compose secret, mode 0600 in a 0700 directory, the passfile carrying the
    PostgreSQL password for the replicas' user and database; a second run keeps them all."""
    secrets = tmp_path / "secrets"
    _make_secrets(secrets)
    compose = files.compose()
    assert {p.name for p in secrets.iterdir()} == set(compose["secrets"])
    assert secrets.stat().st_mode & 0o777 == 0o700
    for path in secrets.iterdir():
        assert path.stat().st_mode & 0o777 == 0o600, path
    password = (secrets / "postgres-password").read_text().strip()
    assert len(password) >= 32 and password.isalnum()
    env = files.environment(compose["services"]["postgres"])
    user, db = env["POSTGRES_USER"], env["POSTGRES_DB"]
    assert (secrets / "postgres-passfile").read_text() == f"*:*:{db}:{user}:{password}\n"
    before = {p.name: p.read_bytes() for p in secrets.iterdir()}
    _make_secrets(secrets)
    assert {p.name: p.read_bytes() for p in secrets.iterdir()} == before


class PostgresSimulator:
    """Enough of PostgreSQL's protocol to learn a client's password: refuse TLS, take the
    startup message, ask for a cleartext password, record it, refuse the login."""

    def __init__(self) -> None:
        self.startup: dict[str, str] = {}
        self.password: str | None = None

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            length, code = struct.unpack("!ii", await reader.readexactly(8))
            if code == SSL_REQUEST:
                writer.write(b"N")
                length, code = struct.unpack("!ii", await reader.readexactly(8))
            assert code == PROTOCOL_3, code
            fields = (await reader.readexactly(length - 8)).split(b"\0")
            self.startup = {
                k.decode(): v.decode() for k, v in zip(fields[::2], fields[1::2], strict=False) if k
            }
            writer.write(b"R" + struct.pack("!ii", 8, 3))  # AuthenticationCleartextPassword
            await writer.drain()
            kind, length = struct.unpack("!ci", await reader.readexactly(5))
            assert kind == b"p", kind
            self.password = (await reader.readexactly(length - 4)).rstrip(b"\0").decode()
            error = b"SFATAL\0C28P01\0Mpassword recorded\0\0"
            writer.write(b"E" + struct.pack("!i", len(error) + 4) + error)
            await writer.drain()
        finally:
            writer.close()


async def test_replicas_send_the_passfile_password(tmp_path: Path) -> None:
    """With the compose file's database URL (the passfile moved to where make-secrets wrote
    it, the host to the simulator), the control plane's driver logs in as the compose user to
    the compose database with the password from the passfile."""
    secrets = tmp_path / "secrets"
    _make_secrets(secrets)
    compose = files.compose()
    replica = next(s for s in compose["services"].values() if "serve" in (s.get("command") or []))
    url = make_url(files.environment(replica)["EDGED_CP_DATABASE_URL"])
    passfile = Path(str(url.query["passfile"]))
    assert passfile.parent == Path("/run/secrets")
    simulator = PostgresSimulator()
    server = await asyncio.start_server(simulator, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    local = url.set(host="127.0.0.1", port=port).update_query_dict(
        {"passfile": str(secrets / passfile.name)}
    )
    engine = create_async_engine(local)
    try:
        with pytest.raises(DBAPIError, match="password recorded"):
            async with engine.connect():
                pass
    finally:
        await engine.dispose()
        server.close()
        await server.wait_closed()
    assert simulator.startup["user"] == url.username
    assert simulator.startup["database"] == url.database
    assert simulator.password == (secrets / "postgres-password").read_text().strip()
