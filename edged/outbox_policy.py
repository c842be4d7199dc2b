"""Outbox policy, pure: record classes, the quota eviction plan and the outbox clock.

Nothing here touches a file or a socket; the outbox feeds it numbers and applies the verdict.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "DEFAULT_CLASSES",
    "EvictionPlan",
    "OutboxClock",
    "RecordClass",
    "plan_eviction",
]


@dataclass(frozen=True, slots=True)
class RecordClass:
    """One kind of record: its drain priority (0 drains first and is dropped last), how long it
    may wait (seconds of device uptime), its share of the disk quota (what it may hold while
    others need room; higher classes may still take it when the quota is full), whether an
    enqueue waits for the record to be durable, and the uplink channel it travels on."""

    name: str
    priority: int
    ttl_s: float
    share: float
    durable: bool
    channel: str

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"record class name {self.name!r} must be an identifier")
        if self.priority < 0:
            raise ValueError(f"record class {self.name}: priority must not be negative")
        if not (self.ttl_s > 0 and math.isfinite(self.ttl_s)):
            raise ValueError(f"record class {self.name}: ttl_s must be a positive number")
        if not 0 <= self.share <= 1:
            raise ValueError(f"record class {self.name}: share must be between 0 and 1")


DAY = 86_400.0
DEFAULT_CLASSES: tuple[RecordClass, ...] = (
    RecordClass("event", 0, ttl_s=30 * DAY, share=0.1, durable=True, channel="events"),
    RecordClass("telemetry", 1, ttl_s=7 * DAY, share=0.3, durable=False, channel="telemetry"),
    RecordClass("sample", 2, ttl_s=7 * DAY, share=0.6, durable=True, channel="samples"),
)


def check_classes(classes: Sequence[RecordClass]) -> None:
    """Names and priorities unique, shares adding up to at most 1."""
    if not classes:
        raise ValueError("at least one record class is needed")
    if len({c.name for c in classes}) != len(classes):
        raise ValueError("record class names must be unique")
    if len({c.priority for c in classes}) != len(classes):
        raise ValueError("record class priorities must be unique")
    if sum(c.share for c in classes) > 1 + 1e-9:
        raise ValueError("record class shares add up to more than 1")


@dataclass(frozen=True, slots=True)
class EvictionPlan:
    """Bytes to delete per class (oldest first) and incoming bytes to refuse per class."""

    evict: Mapping[str, int] = field(default_factory=dict)
    refuse: Mapping[str, int] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not any(self.evict.values()) and not any(self.refuse.values())


def plan_eviction(
    classes: Sequence[RecordClass],
    stored: Mapping[str, int],
    incoming: Mapping[str, int],
    quota: int,
) -> EvictionPlan:
    """What must go so that stored + incoming bytes fit in `quota`.

    Incoming records are placed highest priority first. Room for a record is only ever
    taken from its own class or less important ones, so an alert is never evicted for a
    sample:
    1. those classes holding more than their share pay first, lowest priority first (the
       highest-priority class is exempt: alerts go last whatever their share);
    2. then any of them, lowest priority first, oldest first;
    3. whatever still does not fit is refused."""
    evict = {c.name: 0 for c in classes}
    refuse = {c.name: 0 for c in classes}
    top = min(c.priority for c in classes)
    lowest_first = sorted(classes, key=lambda c: c.priority, reverse=True)
    used = sum(stored.values())
    for arriving in sorted(classes, key=lambda c: c.priority):
        size = incoming.get(arriving.name, 0)
        need = used + size - max(quota, 0)
        payers = [c for c in lowest_first if c.priority >= arriving.priority]
        for cls in payers:
            if need <= 0 or cls.priority == top:
                continue
            held = stored.get(cls.name, 0) - evict[cls.name]
            over_share = held + incoming.get(cls.name, 0) - int(cls.share * quota)
            take = min(need, held, max(over_share, 0))
            evict[cls.name] += take
            need -= take
        for cls in payers:
            if need <= 0:
                break
            take = min(need, stored.get(cls.name, 0) - evict[cls.name])
            evict[cls.name] += take
            need -= take
        refused = min(max(need, 0), size)
        refuse[arriving.name] += refused
        used = (
            sum(stored.values())
            - sum(evict.values())
            + sum(
                incoming.get(c.name, 0) - refuse[c.name]
                for c in classes
                if c.priority <= arriving.priority
            )
        )
    return EvictionPlan(
        {k: v for k, v in evict.items() if v}, {k: v for k, v in refuse.items() if v}
    )


class OutboxClock:
    """Seconds of device uptime since the outbox was first created: resumes from the last
    persisted reading after a restart and never runs backwards, whatever the wall clock or
    the monotonic source do. TTLs are measured on it, so a clock set back or jumping forward
    at NTP sync neither keeps records forever nor expires them all at once."""

    def __init__(self, resume_from: float, monotonic: Callable[[], float]) -> None:
        self._monotonic = monotonic
        self._base = max(resume_from, 0.0)
        self._start = monotonic()
        self._last = self._base

    def now(self) -> float:
        reading = self._monotonic()
        if reading < self._start:  # the source itself went backwards: re-anchor
            self._base, self._start = self._last, reading
        self._last = max(self._last, self._base + (reading - self._start))
        return self._last
