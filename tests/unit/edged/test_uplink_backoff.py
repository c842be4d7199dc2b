"""The uplink's reconnect backoff."""

from __future__ import annotations


def test_reconnect_backoff_has_full_jitter() -> None:
    """The uplink's waits are spread between 0 and the exponential cap, so a fleet that lost
    its broker at the same moment does not come back at the same moment."""
    from tenacity import RetryCallState

    from edged.uplink import backoff_wait

    wait = backoff_wait(initial_s=1.0, max_s=120.0)
    for attempt, cap in [(1, 1.0), (3, 4.0), (10, 120.0)]:
        state = RetryCallState(None, None, (), {})  # type: ignore[arg-type]
        state.attempt_number = attempt
        waits = [wait(state) for _ in range(2000)]
        assert 0 <= min(waits) < 0.1 * cap and 0.9 * cap < max(waits) <= cap
        assert len({round(w, 6) for w in waits}) > 1900  # no two devices in step
