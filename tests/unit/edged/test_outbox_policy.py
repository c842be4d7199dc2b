"""Outbox policy: who pays when the quota is reached, and a clock that never runs back."""

from __future__ import annotations

import pytest

from edged.outbox_policy import (
    DEFAULT_CLASSES,
    EvictionPlan,
    OutboxClock,
    RecordClass,
    check_classes,
    plan_eviction,
)

CLASSES = (
    RecordClass("event", 0, ttl_s=100, share=0.1, durable=True, channel="events"),
    RecordClass("telemetry", 1, ttl_s=100, share=0.3, durable=False, channel="telemetry"),
    RecordClass("sample", 2, ttl_s=100, share=0.6, durable=True, channel="samples"),
)


def test_nothing_to_do_under_quota() -> None:
    """Within the quota, nothing is evicted or refused."""
    plan = plan_eviction(CLASSES, {"event": 10, "sample": 500}, {"telemetry": 100}, 1000)
    assert plan == EvictionPlan() and plan.empty


def test_class_over_its_share_pays_first() -> None:
    """A telemetry flood over its share evicts telemetry before samples under their share."""
    stored = {"event": 50, "telemetry": 400, "sample": 500}
    plan = plan_eviction(CLASSES, stored, {"telemetry": 100}, 1000)
    assert plan.evict == {"telemetry": 50} and not plan.refuse


def test_lowest_priority_goes_first_then_events_last() -> None:
    """When nothing is over its share, samples go before telemetry, events last of all."""
    stored = {"event": 100, "telemetry": 300, "sample": 600}
    assert plan_eviction(CLASSES, stored, {"event": 50}, 1000).evict == {"sample": 50}
    plan = plan_eviction(CLASSES, stored, {"event": 950}, 1000)
    assert plan.evict == {"sample": 600, "telemetry": 300, "event": 50}
    assert not plan.refuse


def test_incoming_that_cannot_fit_is_refused_lowest_first() -> None:
    """With everything evicted and still no room, the incoming remainder is refused."""
    plan = plan_eviction(CLASSES, {"event": 0}, {"event": 700, "sample": 600}, 1000)
    assert plan.refuse == {"sample": 300}
    assert plan_eviction(CLASSES, {}, {"event": 10}, 0).refuse == {"event": 10}


def test_class_set_is_checked() -> None:
    """Duplicate names or priorities and shares over 1 are configuration errors."""
    check_classes(DEFAULT_CLASSES)
    with pytest.raises(ValueError, match="names must be unique"):
        check_classes((CLASSES[0], CLASSES[0]))
    with pytest.raises(ValueError, match="add up to more than 1"):
        check_classes((CLASSES[1], CLASSES[2], RecordClass("x", 9, 1, 0.5, True, "events")))
    with pytest.raises(ValueError, match="ttl_s must be a positive"):
        RecordClass("y", 3, 0, 0.1, True, "events")


def test_clock_resumes_and_never_runs_backwards() -> None:
    """The outbox clock resumes from its persisted reading and ignores a source that jumps
    backwards, then keeps counting from where it was."""
    source = [100.0]
    clock = OutboxClock(resume_from=5_000.0, monotonic=lambda: source[0])
    assert clock.now() == 5_000.0
    source[0] = 130.0
    assert clock.now() == 5_030.0
    source[0] = 40.0  # jumps back (a new boot of the source, a bad clock)
    assert clock.now() == 5_030.0
    source[0] = 50.0
    assert clock.now() == 5_040.0


def test_alerts_are_never_evicted_for_less_important_records() -> None:
    """An outbox full of alerts refuses an incoming sample rather than drop an alert; a new
    alert may take the place of an old one."""
    plan = plan_eviction(CLASSES, {"event": 1000}, {"sample": 100}, 1000)
    assert plan.evict == {} and plan.refuse == {"sample": 100}
    plan = plan_eviction(CLASSES, {"event": 1000}, {"event": 100}, 1000)
    assert plan.evict == {"event": 100} and not plan.refuse
    plan = plan_eviction(CLASSES, {"telemetry": 200, "sample": 800}, {"telemetry": 100}, 1000)
    assert plan.evict == {"sample": 100}  # samples are over their share, telemetry is not
