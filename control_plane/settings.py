"""The control plane's configuration: environment variables prefixed `EDGED_CP_` or a TOML
file, typed and checked once at start, unknown keys refused (pydantic-settings).

    database_url      sqlite+aiosqlite:///./edged-cp.db (default) or postgresql+asyncpg://...
    broker_url        mqtt://host:port of the devices' broker; unset: a supervised local
                      Mosquitto with dynamic security on a free loopback port (single machine)
    broker_admin_*    the account that manages device credentials at the broker
    device_broker_url what devices are told to connect to (defaults to broker_url)
    enrollment_ttl_s  default lifetime of an enrollment token
    rollout_tick_s    how often the rollout engine reads ota.* reports and acts on them
    key_dir           the online signing keys (default <data_dir>/keys; never root keys)
    repository_dir    artifacts and patches served to devices (default <data_dir>/repository)
    *_expiry_s        lifetime of each online-signed role; re-signed at half of it
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from control_plane.errors import ControlPlaneError

__all__ = ["Settings", "SettingsError", "load_settings"]


class SettingsError(ControlPlaneError):
    """The configuration is missing a value, is not TOML, or breaks a bound."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDGED_CP_", extra="forbid", frozen=True)

    database_url: str = "sqlite+aiosqlite:///./edged-cp.db"
    data_dir: Path = Path("./edged-cp-data")
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    broker_url: str | None = None
    device_broker_url: str | None = None
    broker_admin_username: str = "edged-control-plane"
    broker_admin_password_file: Path | None = None
    broker_dynsec: bool = True
    local_broker_port: Annotated[int, Field(ge=0, le=65535)] = 0
    ingest: bool = True
    ingest_group: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = "edged-ingest"
    ingest_client_id: str | None = None
    ingest_batch: Annotated[int, Field(ge=1, le=100_000)] = 2000
    ingest_linger_s: Annotated[float, Field(gt=0, le=10)] = 0.05
    max_message_bytes: Annotated[int, Field(ge=1024, le=64 << 20)] = 1 << 20
    enrollment_ttl_s: Annotated[float, Field(gt=0, le=30 * 86_400)] = 3600.0
    online_timeout_s: Annotated[float, Field(gt=0)] = 300.0
    device_cache_s: Annotated[float, Field(ge=0, le=3600)] = 5.0
    token_cache_s: Annotated[float, Field(ge=0, le=60)] = 2.0
    # per source address and replica, a minute's moving window (0: no limit)
    enroll_per_minute: Annotated[int, Field(ge=0, le=1_000_000)] = 60
    auth_failures_per_minute: Annotated[int, Field(ge=0, le=1_000_000)] = 20
    key_dir: Path | None = None
    repository_dir: Path | None = None
    max_bundle_bytes: Annotated[int, Field(ge=1024, le=512 << 20)] = 256 << 20
    # every request body but a bundle upload (max_bundle_bytes)
    max_request_bytes: Annotated[int, Field(ge=64 << 10, le=256 << 20)] = 4 << 20
    targets_expiry_s: Annotated[int, Field(ge=4, le=366 * 86_400)] = 90 * 86_400
    snapshot_expiry_s: Annotated[int, Field(ge=4, le=366 * 86_400)] = 7 * 86_400
    timestamp_expiry_s: Annotated[int, Field(ge=4, le=366 * 86_400)] = 86_400
    repository_check_s: Annotated[float, Field(gt=0, le=3600)] = 60.0
    # staged rollouts (control_plane.rollouts): how often the engine acts, and how far back
    # past its cursor it re-reads events (ingest's commits may land out of receipt order)
    rollout_tick_s: Annotated[float, Field(gt=0, le=3600)] = 5.0
    rollout_event_lag_s: Annotated[float, Field(ge=0, le=3600)] = 60.0

    @field_validator("database_url")
    @classmethod
    def _known_backend(cls, url: str) -> str:
        if not url.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("must start with sqlite+aiosqlite:// or postgresql+asyncpg://")
        return url

    @field_validator("broker_url", "device_broker_url")
    @classmethod
    def _mqtt_url(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("mqtt://", "mqtts://")):
            raise ValueError("must be mqtt://host:port or mqtts://host:port")
        return url

    @property
    def signing_key_dir(self) -> Path:
        return self.key_dir if self.key_dir is not None else self.data_dir / "keys"

    @property
    def artifact_dir(self) -> Path:
        return (
            self.repository_dir
            if self.repository_dir is not None
            else (self.data_dir / "repository")
        )

    @property
    def backend(self) -> str:
        return "postgresql" if self.database_url.startswith("postgresql") else "sqlite"


def _sentence(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "configuration"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    return f"{where}: {message[:1].lower()}{message[1:]}"


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Settings from `path` (TOML) when given, else the environment; overrides win.
    SettingsError with one sentence naming the first problem."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise SettingsError(f"cannot read {path}: {exc.strerror or exc}") from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise SettingsError(f"{path} is not valid TOML: {exc}") from exc
    values.update(overrides)
    try:
        return Settings(**values)
    except ValidationError as exc:
        origin = f"{path}: " if path is not None else ""
        raise SettingsError(origin + _sentence(exc)) from exc
