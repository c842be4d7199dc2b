"""Bandwidth budget for metered links, pure: a token bucket (bytes per second) and a byte
allowance per UTC day. It answers how long to wait before sending; it never sleeps itself."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Budget", "BudgetConfig"]

DAY = 86_400


@dataclass(frozen=True, slots=True)
class BudgetConfig:
    """`bytes_per_s` None means unlimited; `burst_bytes` defaults to one second's worth (at
    least one maximum message); `bytes_per_day` None means unlimited. No message waits
    forever: one bigger than the bucket or the day's allowance goes when the bucket is
    full or the day is fresh."""

    bytes_per_s: float | None = None
    burst_bytes: int | None = None
    bytes_per_day: int | None = None

    def __post_init__(self) -> None:
        if self.bytes_per_s is not None and not self.bytes_per_s > 0:
            raise ValueError("bytes_per_s must be positive")
        if self.bytes_per_day is not None and self.bytes_per_day <= 0:
            raise ValueError("bytes_per_day must be positive")


class Budget:
    """Call `delay(n)` before sending n bytes: 0 means send now (and the bytes are charged),
    a positive number is how many seconds to wait before asking again."""

    def __init__(
        self,
        config: BudgetConfig,
        *,
        monotonic: Callable[[], float],
        wall: Callable[[], float],
        max_message: int,
    ) -> None:
        self.config = config
        self._monotonic = monotonic
        self._wall = wall
        rate = config.bytes_per_s
        self._burst = float(max(config.burst_bytes or (rate or 0), max_message))
        self._tokens = self._burst
        self._refilled = monotonic()
        self._day = self._day_of(wall())
        self.spent_today = 0

    @staticmethod
    def _day_of(wall: float) -> int:
        return int(wall // DAY)

    def delay(self, size: int) -> float:
        today = self._day_of(self._wall())
        if today > self._day:
            self._day, self.spent_today = today, 0
        elif today < self._day:  # the clock went back: a new day, not a fresh allowance
            self._day = today
        limit = self.config.bytes_per_day
        # A message bigger than the whole allowance goes first thing in a day, alone, rather
        # than never: the day then counts as spent.
        if limit is not None and self.spent_today + size > limit and self.spent_today > 0:
            return max(1.0, (today + 1) * DAY - self._wall())
        rate = self.config.bytes_per_s
        if rate is not None:
            now = self._monotonic()
            self._tokens = min(self._burst, self._tokens + (now - self._refilled) * rate)
            self._refilled = now
            # A message bigger than the bucket goes once the bucket is full, and the debt
            # (tokens below zero) holds back what follows: the rate holds on average.
            needed = min(size, self._burst)
            if self._tokens < needed:
                return (needed - self._tokens) / rate
            self._tokens -= size
        self.spent_today += size
        return 0.0

    @property
    def day(self) -> int:
        return self._day

    def restore(self, day: int, spent: int) -> None:
        """Carry over what was sent today before a restart (and on a later day by the saved
        reckoning: the clock went back over the restart)."""
        today = self._day_of(self._wall())
        if day >= today:
            self._day, self.spent_today = today, max(spent, 0)

    @property
    def unlimited(self) -> bool:
        return self.config.bytes_per_s is None and self.config.bytes_per_day is None

    @property
    def burst(self) -> float:
        return self._burst if self.config.bytes_per_s is not None else math.inf
