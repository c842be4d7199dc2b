"""The bandwidth budget: a token bucket per second and an allowance per UTC day."""

from __future__ import annotations

import pytest

from edged.budget import DAY, Budget, BudgetConfig


def make(config: BudgetConfig, max_message: int = 1000, clock: dict | None = None):
    clock = clock if clock is not None else {"mono": 0.0, "wall": 10 * DAY + 3600.0}
    budget = Budget(
        config, monotonic=lambda: clock["mono"], wall=lambda: clock["wall"], max_message=max_message
    )
    return budget, clock


def test_unlimited_budget_never_waits() -> None:
    """Without limits every send goes at once."""
    budget, _ = make(BudgetConfig())
    assert budget.unlimited and all(budget.delay(10_000) == 0 for _ in range(100))


def test_rate_limit_spreads_sends() -> None:
    """At 1000 B/s with a 1000 B burst: the burst goes, then the next 500 B waits 0.5 s, and
    goes once the clock has moved that far."""
    budget, clock = make(BudgetConfig(bytes_per_s=1000))
    assert budget.delay(1000) == 0
    assert budget.delay(500) == pytest.approx(0.5)
    clock["mono"] += 0.5
    assert budget.delay(500) == 0
    assert budget.delay(1) > 0


def test_a_message_bigger_than_the_rate_still_goes() -> None:
    """The bucket holds at least one maximum message, so a big message is never stuck."""
    budget, clock = make(BudgetConfig(bytes_per_s=10), max_message=4096)
    assert budget.delay(4096) == 0
    clock["mono"] += 409.6
    assert budget.delay(4096) == 0


def test_daily_allowance_waits_for_the_next_utc_day() -> None:
    """Once the day's bytes are spent, the delay runs to the next UTC midnight, and the
    allowance is fresh then."""
    budget, clock = make(BudgetConfig(bytes_per_day=3000))
    assert [budget.delay(1000) for _ in range(3)] == [0, 0, 0]
    assert budget.delay(1) == pytest.approx(DAY - 3600.0)
    clock["wall"] += DAY - 3600.0
    assert budget.delay(1000) == 0 and budget.spent_today == 1000


def test_a_clock_set_back_grants_no_fresh_allowance() -> None:
    """The wall clock jumps back a day (an NTP correction, a dead RTC): what was spent still
    counts, before and after a restart; the next day, reached forward, is fresh (before, any
    change of day reset the spending, backwards too)."""
    budget, clock = make(BudgetConfig(bytes_per_day=3000))
    assert [budget.delay(1000) for _ in range(3)] == [0, 0, 0]
    clock["wall"] -= DAY
    assert budget.delay(1000) > 0 and budget.spent_today == 3000
    restarted, _ = make(BudgetConfig(bytes_per_day=3000), clock=clock)
    restarted.restore(budget.day + 1, 3000)  # saved on the later day
    assert restarted.delay(1000) > 0 and restarted.spent_today == 3000
    clock["wall"] += DAY
    assert budget.delay(1000) == 0 and budget.spent_today == 1000


def test_bad_configuration_is_refused() -> None:
    """Zero or negative limits are configuration errors."""
    with pytest.raises(ValueError, match="bytes_per_s must be positive"):
        BudgetConfig(bytes_per_s=0)
    with pytest.raises(ValueError, match="bytes_per_day must be positive"):
        BudgetConfig(bytes_per_day=-1)


def test_oversize_messages_go_eventually_and_the_rate_holds() -> None:
    """A message bigger than the bucket waits for a full bucket, then goes and leaves a debt;
    one bigger than the day's allowance goes first thing in a fresh day."""
    budget, _ = make(BudgetConfig(bytes_per_s=5000), max_message=4096)
    assert budget.delay(20_000) == 0  # the bucket was full
    wait = budget.delay(100)
    assert wait == pytest.approx((15_000 + 100) / 5000)  # the debt is paid off first
    daily, _ = make(BudgetConfig(bytes_per_day=1000))
    assert daily.delay(5000) == 0
    assert daily.delay(1) > 0
