"""What `edged-control-plane` sets up before serving: the first operator token, the secret
files it keeps, and the broker (a supervised local Mosquitto with dynamic security when no
broker URL is configured)."""

from __future__ import annotations

import secrets
import time
import uuid
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from control_plane.auth import SCOPED_ADMIN, Role, hash_secret, new_secret
from control_plane.broker_admin import BrokerAdmin, DynsecAdmin, NullBrokerAdmin
from control_plane.db.engine import Database
from control_plane.db.models import AuditEntry, OperatorToken
from control_plane.errors import ControlPlaneError
from control_plane.ingest import IngestConfig
from control_plane.local_broker import DynsecBootstrap, MosquittoBroker
from control_plane.settings import Settings
from control_plane.state import BrokerEndpoint
from edged.atomic import atomic_write

__all__ = ["BrokerSetup", "create_token", "open_broker", "read_or_make_secret"]


async def create_token(
    db: Database,
    name: str,
    role: Role,
    groups: list[str] | None = None,
    expires_in_s: float | None = None,
) -> tuple[str, str]:
    """(token id, secret) of a new operator token, written straight to the database (the
    way in for the first admin). Refused for an admin with groups (auth.SCOPED_ADMIN)."""
    if role is Role.admin and groups is not None:
        raise ControlPlaneError(SCOPED_ADMIN)
    now = time.time()
    secret = new_secret("edcp")
    token_id = uuid.uuid4().hex
    async with db.session() as session:
        session.add(
            OperatorToken(
                id=token_id,
                name=name,
                token_hash=hash_secret(secret),
                role=role.name,
                groups=sorted(set(groups)) if groups is not None else None,
                created_at=now,
                created_by=None,
                expires_at=now + expires_in_s if expires_in_s else None,
            )
        )
        session.add(
            AuditEntry(
                at=now,
                actor="edged-control-plane create-token",
                role=None,
                action="token.create",
                target=token_id,
                outcome="ok",
                source="local",
                detail={"name": name, "role": role.name, "groups": groups},
            )
        )
        await session.commit()
    return token_id, secret


def read_or_make_secret(path: Path) -> str:
    """The secret in `path`, made (0600, atomically) when the file does not exist."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    secret = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(path, secret.encode(), mode=0o600)
    return secret


def _endpoint(url: str) -> BrokerEndpoint:
    parts = urlsplit(url)
    tls = parts.scheme == "mqtts"
    if not parts.hostname:
        raise ControlPlaneError(f"broker URL {url!r} names no host")
    return BrokerEndpoint(parts.hostname, parts.port or (8883 if tls else 1883), tls)


@dataclass(frozen=True, slots=True)
class BrokerSetup:
    """The broker side of a running control plane: admin client, device endpoint, ingest."""

    admin: BrokerAdmin
    device: BrokerEndpoint
    ingest: IngestConfig | None
    local: MosquittoBroker | None
    login: BrokerAccount  # the control plane's own account: update notices from any replica


@dataclass(frozen=True, slots=True)
class BrokerAccount:
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None


async def open_broker(settings: Settings, stack: AsyncExitStack) -> BrokerSetup:
    """Connect to the configured broker, or start and supervise a local one."""
    local: MosquittoBroker | None = None
    if settings.broker_url is None:
        password = read_or_make_secret(settings.data_dir / "broker-admin.password")
        local = MosquittoBroker(
            workdir=settings.data_dir / "broker",
            persistence=True,
            die_with_parent=True,
            port=settings.local_broker_port or None,
            dynsec=DynsecBootstrap(settings.broker_admin_username, password),
        )
        local.start()
        stack.callback(local.close)
        endpoint = BrokerEndpoint(local.host, local.port)
        dynsec = True
    else:
        endpoint = _endpoint(settings.broker_url)
        password_file = settings.broker_admin_password_file
        password = password_file.read_text().strip() if password_file else ""
        dynsec = settings.broker_dynsec
    admin: BrokerAdmin
    if dynsec:
        admin = DynsecAdmin(
            endpoint.host, endpoint.port, settings.broker_admin_username, password, tls=endpoint.tls
        )
    else:
        admin = NullBrokerAdmin()
    await stack.enter_async_context(admin)
    device = _endpoint(settings.device_broker_url) if settings.device_broker_url else endpoint
    login = BrokerAccount(
        endpoint.host,
        endpoint.port,
        settings.broker_admin_username if dynsec or password else None,
        password or None,
        endpoint.tls,
    )
    ingest = None
    if settings.ingest:
        ingest = IngestConfig(
            host=login.host,
            port=login.port,
            tls=login.tls,
            username=login.username,
            password=login.password,
            group=settings.ingest_group,
            client_id=settings.ingest_client_id,
            batch=settings.ingest_batch,
            linger_s=settings.ingest_linger_s,
            device_cache_s=settings.device_cache_s,
            max_message_bytes=settings.max_message_bytes,
        )
    return BrokerSetup(admin, device, ingest, local, login)
