"""What one source address may make a replica do before it is told to wait (429): enrollment
attempts, and failed token checks (a guessed, revoked or expired operator or device token).
Moving windows of one minute from the `limits` library, in memory: each replica counts on its
own, so N replicas behind a balancer allow up to N times the rate. The address is the TCP peer,
or what a trusted proxy forwarded (uvicorn's `forwarded_allow_ips`)."""

from __future__ import annotations

import math
import time

from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

__all__ = ["RateLimits"]


class RateLimits:
    """`*_wait(source)`: None when the caller may go on, else the seconds until it may."""

    def __init__(self, enroll_per_minute: int, auth_failures_per_minute: int) -> None:
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self._enroll = RateLimitItemPerMinute(enroll_per_minute) if enroll_per_minute else None
        self._failures = (
            RateLimitItemPerMinute(auth_failures_per_minute) if auth_failures_per_minute else None
        )

    def enroll_wait(self, source: str | None) -> int | None:
        """Count one enrollment attempt from `source`; over the limit, it is not counted."""
        if self._enroll is None or self._limiter.hit(self._enroll, "enroll", source or "?"):
            return None
        return self._wait(self._enroll, "enroll", source)

    def auth_wait(self, source: str | None) -> int | None:
        """Whether `source` used up its failed token checks (checking counts nothing)."""
        if self._failures is None or self._limiter.test(self._failures, "auth", source or "?"):
            return None
        return self._wait(self._failures, "auth", source)

    def auth_failed(self, source: str | None) -> None:
        if self._failures is not None:
            self._limiter.hit(self._failures, "auth", source or "?")

    def _wait(self, item: RateLimitItemPerMinute, kind: str, source: str | None) -> int:
        stats = self._limiter.get_window_stats(item, kind, source or "?")
        return max(1, math.ceil(stats.reset_time - time.time()))
