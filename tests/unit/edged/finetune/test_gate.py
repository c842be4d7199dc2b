"""The validation gate: both tests, at their boundaries, and reasons naming the figures."""

from __future__ import annotations

import pytest

from edged.finetune.gate import GateFigures, GatePolicy, chance, check_holdout_size, decide

POLICY = GatePolicy(min_holdout=20, min_gain=0.02, max_replay_loss=0.02)


def _figures(current: float, candidate: float, base: float = 0.98, replay: float = 0.975):
    return GateFigures(current, candidate, base, replay, fixed=30, broken=2)


def test_better_candidate_that_does_not_forget_is_accepted() -> None:
    """Gain above min_gain and replay loss within bounds: accepted, figures in the reason."""
    verdict = decide(POLICY, _figures(0.61, 0.93))
    assert verdict.accepted
    assert "0.930" in verdict.reason and "0.610" in verdict.reason


def test_gain_exactly_min_gain_is_enough() -> None:
    """holdout_candidate == holdout_current + min_gain passes despite float rounding."""
    assert decide(POLICY, _figures(0.61, 0.63)).accepted


def test_too_small_gain_is_rejected_naming_the_test() -> None:
    """A gain below min_gain is rejected with the hold-out figures."""
    verdict = decide(POLICY, _figures(0.610, 0.412))
    assert not verdict.accepted
    assert verdict.reason == (
        "hold-out accuracy 0.412 does not beat the current model's 0.610 by 0.02"
    )


def test_forgetting_is_rejected_naming_the_test() -> None:
    """A better hold-out with replay accuracy more than max_replay_loss below the base fails."""
    verdict = decide(POLICY, _figures(0.61, 0.93, base=0.98, replay=0.95))
    assert not verdict.accepted
    assert verdict.reason == "replay accuracy 0.950 falls more than 0.02 below the base's 0.980"
    assert decide(POLICY, _figures(0.61, 0.93, base=0.98, replay=0.96)).accepted


def test_too_small_holdout_is_rejected() -> None:
    """Fewer hold-out labels than min_holdout: a rejection naming both numbers; else None."""
    verdict = check_holdout_size(POLICY, 12)
    assert verdict is not None and not verdict.accepted
    assert "12" in verdict.reason and "20" in verdict.reason
    assert check_holdout_size(POLICY, 20) is None


def test_policy_bounds_are_checked() -> None:
    """Thresholds outside their documented ranges are refused on construction."""
    with pytest.raises(ValueError, match="min_holdout"):
        GatePolicy(min_holdout=0)
    with pytest.raises(ValueError, match="min_gain"):
        GatePolicy(min_gain=1.5)


def test_a_gain_within_chance_is_rejected() -> None:
    """Enough gain on paper but few more fixed than broken samples: rejected by the sign
    test, naming both counts; a lopsided gain passes."""
    verdict = decide(POLICY, GateFigures(0.117, 0.143, 1.0, 0.984, fixed=9, broken=7))
    assert not verdict.accepted
    assert verdict.reason.startswith("hold-out gain could be chance: the candidate fixes 9")
    assert decide(POLICY, GateFigures(0.70, 0.90, 1.0, 1.0, fixed=17, broken=2)).accepted


def test_chance_is_the_exact_one_sided_sign_test() -> None:
    """chance(k, n - k) is P(Binomial(n, 1/2) >= k)."""
    assert chance(0, 0) == 1.0
    assert chance(3, 0) == pytest.approx(1 / 8)
    assert chance(6, 1) == pytest.approx(8 / 128)
    assert chance(1, 3) == pytest.approx(15 / 16)
