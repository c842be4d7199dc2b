"""Per-address limits, without a server: counts, the wait they give, addresses apart, off."""

from __future__ import annotations

from control_plane.rate_limits import RateLimits


def test_enrollment_attempts_are_counted_per_address() -> None:
    limits = RateLimits(enroll_per_minute=2, auth_failures_per_minute=0)
    assert [limits.enroll_wait("10.0.0.1") for _ in range(2)] == [None, None]
    wait = limits.enroll_wait("10.0.0.1")
    assert wait is not None and 1 <= wait <= 60
    assert limits.enroll_wait("10.0.0.2") is None  # another address has its own window
    assert limits.auth_wait("10.0.0.1") is None  # 0: failed token checks are not limited


def test_only_failed_token_checks_count() -> None:
    limits = RateLimits(enroll_per_minute=0, auth_failures_per_minute=3)
    for _ in range(10):
        assert limits.auth_wait("10.0.0.1") is None  # checking alone counts nothing
    for _ in range(3):
        limits.auth_failed("10.0.0.1")
    wait = limits.auth_wait("10.0.0.1")
    assert wait is not None and 1 <= wait <= 60
    assert limits.auth_wait("10.0.0.3") is None
    assert all(limits.enroll_wait("10.0.0.1") is None for _ in range(100))
