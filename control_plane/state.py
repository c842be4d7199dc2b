"""What one control-plane process owns while it runs, handed to routes through
`app.state.cp` (see control_plane.app's lifespan)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from control_plane.auth import TokenCache
from control_plane.db.engine import Database
from control_plane.metrics import Metrics
from control_plane.rate_limits import RateLimits
from control_plane.settings import Settings

if TYPE_CHECKING:
    from control_plane.broker_admin import BrokerAdmin
    from control_plane.ingest import Ingest

__all__ = ["BrokerEndpoint", "ControlPlaneState"]


@dataclass(frozen=True, slots=True)
class BrokerEndpoint:
    """Where devices connect: told to each device at enrollment."""

    host: str
    port: int
    tls: bool = False


@dataclass(slots=True)
class ControlPlaneState:
    settings: Settings
    db: Database
    broker_admin: BrokerAdmin
    device_broker: BrokerEndpoint
    metrics: Metrics = field(default_factory=Metrics)
    ingest: Ingest | None = None
    tokens: TokenCache = field(init=False)
    limits: RateLimits = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = TokenCache(self.settings.token_cache_s)
        self.limits = RateLimits(
            self.settings.enroll_per_minute, self.settings.auth_failures_per_minute
        )
