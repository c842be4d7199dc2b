"""The health trial's verdicts, on values and a fake clock: canaries, then a watch of live
traffic against the previous model's figures."""

from __future__ import annotations

import pytest

from edged.config import ConfigError, UpdateConfig, parse_config
from edged.ota.trial import Baseline, Traffic, TrialPolicy, Watch, canary_verdict

POLICY = TrialPolicy(watch_s=300, min_watch_samples=50)
BASE = Baseline(samples=500, mean_confidence=0.95, latency_p50_ms=4.0)


def fed(watch: Watch, n: int, confidence: float = 0.95, latency_ms: float = 4.0) -> Watch:
    for _ in range(n):
        watch.result(confidence, latency_ms)
    return watch


def test_canaries_below_the_minimum_roll_back() -> None:
    """One canary of ten disagreeing fails a 1.0 minimum; at the minimum the watch starts."""
    failed = canary_verdict(0.9, POLICY)
    assert failed.action == "rollback" and "90% agree" in failed.reason
    assert failed.figures == {"canary_agreement": 0.9}
    assert canary_verdict(1.0, POLICY).action == "watch"
    assert canary_verdict(0.8, TrialPolicy(canary_min_agreement=0.8)).action == "watch"


def test_healthy_traffic_commits_when_the_watch_is_over_and_not_before() -> None:
    """Traffic like the previous model's keeps watching until watch_s, then commits."""
    watch = fed(Watch(POLICY, BASE, started=100.0), 200)
    assert watch.verdict(399.9).action == "watch"
    verdict = watch.verdict(400.0)
    assert verdict.action == "commit" and "200 live samples healthy" in verdict.reason
    figures = verdict.figures
    assert figures["samples"] == 200 and figures["confidence_after"] == 0.95
    assert figures["confidence_before"] == 0.95 and figures["latency_ratio"] == 1.0


def test_inference_errors_over_the_rate_roll_back_early() -> None:
    """Errors over max_error_rate roll back as soon as min_watch_samples are in."""
    watch = fed(Watch(POLICY, BASE, started=0.0), 40)
    watch.error(5)
    assert watch.verdict(1.0).action == "watch"  # 45 samples: not enough to judge
    fed(watch, 5)
    verdict = watch.verdict(2.0)
    assert verdict.action == "rollback" and "inference errors: 5 of 50" in verdict.reason
    assert verdict.figures["error_rate"] == 0.1


def test_a_confidence_drop_rolls_back() -> None:
    """Mean confidence more than max_confidence_drop below the previous model's."""
    assert fed(Watch(POLICY, BASE, 0.0), 60, confidence=0.86).verdict(1).action == "watch"
    verdict = fed(Watch(POLICY, BASE, 0.0), 60, confidence=0.80).verdict(1)
    assert verdict.action == "rollback" and verdict.reason.startswith("confidence: mean 0.800")


def test_a_slower_model_rolls_back() -> None:
    """Median latency more than max_latency_ratio times the previous model's."""
    assert fed(Watch(POLICY, BASE, 0.0), 60, latency_ms=7.9).verdict(1).action == "watch"
    verdict = fed(Watch(POLICY, BASE, 0.0), 60, latency_ms=8.1).verdict(1)
    assert verdict.action == "rollback" and "latency: median 8.10 ms" in verdict.reason


def test_without_traffic_the_canaries_decide() -> None:
    """No live samples in watch_s: commit, and the reason says the watch saw too little."""
    verdict = Watch(POLICY, BASE, 0.0).verdict(300)
    assert verdict.action == "commit" and "only 0 live samples" in verdict.reason


def test_without_a_baseline_only_errors_are_judged() -> None:
    """A previous model that served no traffic gives nothing to compare: no confidence or
    latency rollback, and the reason says so."""
    watch = fed(Watch(POLICY, Baseline(), 0.0), 100, confidence=0.2, latency_ms=100)
    assert watch.verdict(10).action == "watch"
    verdict = watch.verdict(300)
    assert verdict.action == "commit" and "no baseline" in verdict.reason


def test_watch_s_zero_commits_on_the_canaries_alone() -> None:
    """watch_s = 0: the first verdict after the canaries commits."""
    assert Watch(TrialPolicy(watch_s=0), BASE, 5.0).verdict(5.0).action == "commit"


def test_traffic_measures_the_baseline_and_it_survives_a_round_trip() -> None:
    """Traffic keeps the serving model's recent figures; a Baseline goes through the trial
    record and back, and unreadable fields read as not measured."""
    traffic = Traffic(capacity=4)
    assert traffic.baseline() == Baseline()
    for confidence, latency in [(0.1, 100.0), (0.9, 1.0), (0.8, 3.0), (0.7, 2.0), (0.6, 4.0)]:
        traffic.add(confidence, latency)
    base = traffic.baseline()
    assert base.samples == 4 and base.mean_confidence == pytest.approx(0.75)
    assert base.latency_p50_ms == 2.5
    assert Baseline.from_dict(base.to_dict()) == base
    assert Baseline.from_dict({"samples": "x", "mean_confidence": "y"}) == Baseline()


def test_the_update_section_has_documented_defaults_and_bounds() -> None:
    """[update] parses with its defaults; out-of-bounds values are refused naming the key."""
    assert parse_config("").update == UpdateConfig()
    assert TrialPolicy.from_config(UpdateConfig()) == TrialPolicy()
    update = parse_config("[update]\nhardware = 'rpi4'\nwatch_s = 0\n").update
    assert (update.hardware, update.channel, update.watch_s) == ("rpi4", "stable", 0)
    for text, key in [
        ("max_start_attempts = 0", "update.max_start_attempts"),
        ("canary_min_agreement = 1.5", "update.canary_min_agreement"),
        ("max_latency_ratio = 0.5", "update.max_latency_ratio"),
        ("hardware = 'Pi 4'", "update.hardware"),
        ("channel = ''", "update.channel"),
        ("poll_s = 1", "update.poll_s"),
    ]:
        with pytest.raises(ConfigError, match=key):
            parse_config(f"[update]\n{text}\n")
