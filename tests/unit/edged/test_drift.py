"""Drift statistics on real data: scikit-learn's digits, with a logistic regression for the
confidences, reference statistics measured on the validation split as the packer does."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt
import pytest

# Real digits and a real classifier come from the train extra; the device-only (legacy)
# environment has neither, and the main environment runs these tests.
pytest.importorskip("sklearn", reason="scikit-learn (train extra) is not installed here")
from scipy.ndimage import rotate
from sklearn.linear_model import LogisticRegression

from control_plane.toolchain.datasets import digits_dataset
from edged.drift import DriftAlarm, DriftConfig, DriftMonitor
from edged.errors import InputError, ModelError
from edged_formats import ConfidenceHistogram, ReferenceStats

SHAPE = (8, 8, 1)
Array = npt.NDArray[Any]


@dataclass(frozen=True)
class Digits:
    reference: ReferenceStats
    x_test: Array
    conf_test: Array
    model: LogisticRegression

    def confidence(self, x: Array) -> Array:
        return self.model.predict_proba(x.reshape(len(x), -1)).max(axis=1)


def reference_stats(raw: Array, confidence: Array, granularity: str = "element") -> ReferenceStats:
    """The packer's computation: raw features as float64, 20 confidence bins over [0, 1]."""
    samples = raw.astype(np.float64)
    if granularity == "element":
        features = samples.reshape(len(samples), -1)
    else:
        features = samples.reshape(-1, samples.shape[-1])
    counts, _ = np.histogram(confidence, bins=20, range=(0.0, 1.0))
    return ReferenceStats(
        granularity=granularity,  # type: ignore[arg-type]
        feature_mean=tuple(features.mean(axis=0).tolist()),
        feature_std=tuple(features.std(axis=0).tolist()),
        confidence_histogram=ConfidenceHistogram(tuple(counts.tolist())),
        confidence_quantiles={"0.5": float(np.quantile(confidence, 0.5))},
        samples=len(raw),
    )


@pytest.fixture(scope="module")
def digits() -> Digits:
    data = digits_dataset()
    model = LogisticRegression(max_iter=2000).fit(
        data.x_train.reshape(len(data.x_train), -1), data.y_train
    )
    val_conf = model.predict_proba(data.x_val.reshape(len(data.x_val), -1)).max(axis=1)
    test_conf = model.predict_proba(data.x_test.reshape(len(data.x_test), -1)).max(axis=1)
    return Digits(reference_stats(data.x_val, val_conf), data.x_test, test_conf, model)


def draw(digits: Digits, n: int, seed: int) -> tuple[Array, Array]:
    """n held-out digits drawn with replacement, with the model's confidences."""
    idx = np.random.default_rng(seed).integers(0, len(digits.x_test), n)
    return digits.x_test[idx], digits.conf_test[idx]


def rotated(x: Array, degrees: float) -> Array:
    out = rotate(x.astype(np.float64), degrees, axes=(1, 2), reshape=False, order=1)
    return np.clip(np.rint(out), 0, 16).astype(np.uint8)


def noisy(x: Array, sigma: float, seed: int) -> Array:
    out = x + np.random.default_rng(seed).normal(0.0, sigma, x.shape)
    return np.clip(np.rint(out), 0, 16).astype(np.uint8)


def feed(monitor: DriftMonitor, x: Array, conf: Array, batch: int = 16) -> list[DriftAlarm]:
    alarms: list[DriftAlarm] = []
    for i in range(0, len(x), batch):
        alarms += monitor.observe(x[i : i + batch], conf[i : i + batch])
    return alarms


def first(alarms: list[DriftAlarm], kind: str) -> DriftAlarm:
    return next(a for a in alarms if a.kind == kind)


def test_clean_held_out_stream_raises_no_alarm(digits: Digits) -> None:
    """50,000 held-out digits (997 windows) raise nothing; the feature and CUSUM scores stay
    under their re-arm levels (the PSI of 200-sample windows is noisier: it peaks near 0.22)."""
    monitor = DriftMonitor(digits.reference, DriftConfig(), SHAPE)
    x, conf = draw(digits, 50_000, seed=1)
    peaks = dict.fromkeys(("confidence_psi", "feature_shift", "confidence_cusum"), 0.0)
    alarms: list[DriftAlarm] = []
    for i in range(0, len(x), 50):
        alarms += monitor.observe(x[i : i + 50], conf[i : i + 50])
        peaks = {k: max(v, monitor.scores[k]) for k, v in peaks.items()}  # type: ignore[index]
    assert alarms == []
    assert monitor.windows == (50_000 - 200) // 50 + 1
    assert peaks["confidence_psi"] < 0.25
    assert peaks["feature_shift"] < 0.8 * 0.5
    assert peaks["confidence_cusum"] < 0.8 * 10


@pytest.mark.parametrize(
    ("drift", "within"),
    [("rotate 30", 100), ("noise 4", 100), ("rotate 15", 200), ("noise 2", 200)],
)
def test_drifted_digits_raise_a_feature_shift(digits: Digits, drift: str, within: int) -> None:
    """Rotated or noisy digits starting mid-hop raise `feature_shift` within the documented
    number of samples (docs/drift.md)."""
    monitor = DriftMonitor(digits.reference, DriftConfig(), SHAPE)
    clean_x, clean_conf = draw(digits, 430, seed=2)
    assert feed(monitor, clean_x, clean_conf) == []
    x, _ = draw(digits, 400, seed=3)
    kind, amount = drift.split()
    x = rotated(x, float(amount)) if kind == "rotate" else noisy(x, float(amount), seed=4)
    alarm = first(feed(monitor, x, digits.confidence(x)), "feature_shift")
    assert alarm.samples - 430 <= within
    assert alarm.score >= alarm.threshold == 0.5


def test_confidence_drop_raises_psi_and_cusum(digits: Digits) -> None:
    """Confidences 0.1 lower on the same inputs: CUSUM fires within 20 samples, the PSI
    within one hop plus a window evaluation (100 samples); the inputs do not alarm."""
    monitor = DriftMonitor(digits.reference, DriftConfig(), SHAPE)
    x, conf = draw(digits, 1430, seed=5)
    assert feed(monitor, x[:430], conf[:430]) == []
    alarms = feed(monitor, x[430:], np.maximum(conf[430:] - 0.1, 0.1))
    assert first(alarms, "confidence_cusum").samples - 430 <= 20
    assert first(alarms, "confidence_psi").samples - 430 <= 100
    assert [a.kind for a in alarms if a.kind == "feature_shift"] == []


def test_cusum_counts_samples_across_batches(digits: Digits) -> None:
    """Each sample far below the reference moves the CUSUM by 3 - 0.5 stds (the clip minus
    the slack), so the 4th such sample crosses 10, wherever batches split."""
    monitor = DriftMonitor(digits.reference, DriftConfig(), SHAPE)
    x, _ = draw(digits, 6, seed=6)
    assert monitor.observe(x[:3], np.zeros(3)) == []
    (alarm,) = monitor.observe(x[3:], np.zeros(3))
    assert alarm == DriftAlarm("confidence_cusum", 10.0, 10.0, 4)


def test_alarms_fire_once_while_drifted_and_rearm_after_recovery(digits: Digits) -> None:
    """A long drift raises each kind once; after recovery every kind re-arms (scores under
    0.8 x threshold) and the next drift raises them again."""
    monitor = DriftMonitor(digits.reference, DriftConfig(), SHAPE)
    x, conf = draw(digits, 2000, seed=7)
    drifted = rotated(x, 30)
    drifted_conf = np.maximum(digits.confidence(drifted) - 0.1, 0.1)
    first_drift = feed(monitor, drifted, drifted_conf)
    kinds = sorted(a.kind for a in first_drift)
    assert kinds == ["confidence_cusum", "confidence_psi", "feature_shift"]
    assert feed(monitor, x, conf) == []
    assert not any(monitor.active.values())
    assert sorted(a.kind for a in feed(monitor, drifted, drifted_conf)) == kinds


def test_reset_for_a_new_model_starts_from_nothing(digits: Digits) -> None:
    """After a model swap nothing is active, counters are zero, and the new reference is the
    one compared with; a reference that does not fit the samples is a ModelError."""
    monitor = DriftMonitor(digits.reference, DriftConfig(), SHAPE)
    x, conf = draw(digits, 400, seed=8)
    assert feed(monitor, rotated(x, 30), conf)
    monitor.reset(reference_stats(rotated(x, 30), conf), SHAPE)
    assert monitor.samples == monitor.windows == 0 and not any(monitor.active.values())
    assert feed(monitor, rotated(x, 30), conf) == []
    with pytest.raises(ModelError, match="64 element features but samples of shape"):
        monitor.reset(digits.reference, (8, 8, 2))


def test_reconfigure_keeps_state_unless_the_window_changes(digits: Digits) -> None:
    """New thresholds keep windows, scores and active alarms (no second alarm for the same
    drift); a new window restarts, its first evaluation after `window` samples."""
    monitor = DriftMonitor(digits.reference, DriftConfig(), SHAPE)
    x, conf = draw(digits, 400, seed=9)
    assert first(feed(monitor, rotated(x, 30), conf), "feature_shift")
    monitor.reconfigure(DriftConfig(feature_threshold=0.6, cusum_threshold=12.0))
    assert (monitor.samples, monitor.active["feature_shift"]) == (400, True)
    assert feed(monitor, rotated(x, 30), conf) == []
    monitor.reconfigure(DriftConfig(window=40, hop=20))
    assert monitor.samples == 0 and not any(monitor.active.values())
    feed(monitor, x[:39], conf[:39])
    assert monitor.windows == 0
    feed(monitor, x[39:40], conf[39:40])
    assert (monitor.samples, monitor.windows) == (40, 1)


def test_switched_off_it_observes_nothing_and_on_again_starts_afresh(digits: Digits) -> None:
    """`enabled = false`: a drift that alarms when on raises nothing and counts no sample;
    switched back on, it starts from nothing and alarms on the same drift."""
    x, conf = draw(digits, 400, seed=12)
    drifted = rotated(x, 30)
    monitor = DriftMonitor(digits.reference, DriftConfig(enabled=False), SHAPE)
    assert feed(monitor, drifted, conf) == []
    summary = monitor.summary()
    assert (summary["enabled"], summary["samples"], summary["windows"]) == (False, 0, 0)
    monitor.reconfigure(DriftConfig())
    assert first(feed(monitor, drifted, conf), "feature_shift")
    monitor.reconfigure(DriftConfig(enabled=False))
    assert monitor.samples == 0 and not any(monitor.active.values())
    assert feed(monitor, drifted, conf) == []


def test_summary_is_compact_telemetry(digits: Digits) -> None:
    """The summary holds counters, the three scores, the confidence means and alarm flags."""
    monitor = DriftMonitor(digits.reference, DriftConfig(), SHAPE)
    x, conf = draw(digits, 250, seed=10)
    feed(monitor, x, conf)
    summary = monitor.summary()
    assert summary["samples"] == 250 and summary["windows"] == 2
    assert summary["confidence_psi_alarm"] is False
    assert 0.9 < summary["window_confidence"] <= 1.0  # type: ignore[operator]
    assert set(summary) == {
        "enabled",
        "samples",
        "windows",
        "reference_confidence",
        "window_confidence",
        "confidence_psi",
        "feature_shift",
        "confidence_cusum",
        "confidence_psi_alarm",
        "feature_shift_alarm",
        "confidence_cusum_alarm",
    }
    assert msgspec.json.decode(msgspec.json.encode(summary)) == summary


def test_channel_granularity_on_images(digits: Digits) -> None:
    """Digits blown up to 72x72 RGB images (channel features, pooled over pixels as the
    packer does): held-out images raise nothing, images 40 % darker a feature shift within
    one window."""

    def images(x: Array) -> Array:
        big = np.kron(x[..., 0], np.ones((9, 9), dtype=np.uint8)).astype(np.float64) * 15
        return np.stack((big, big / 2, 255 - big), axis=-1).astype(np.uint8)

    data = digits_dataset()
    reference = reference_stats(images(data.x_val), digits.confidence(data.x_val), "channel")
    assert reference.granularity == "channel" and len(reference.feature_mean) == 3
    monitor = DriftMonitor(reference, DriftConfig(), (72, 72, 3))
    x, conf = draw(digits, 1000, seed=11)
    assert feed(monitor, images(x), conf) == []
    darker = (images(x[:200]) * 0.6).astype(np.uint8)
    assert first(feed(monitor, darker, conf[:200]), "feature_shift").samples <= 1200


def test_inputs_that_do_not_fit_are_refused(digits: Digits) -> None:
    """Wrong sample shapes, a confidence count that differs, or a NaN confidence raise
    InputError and change nothing."""
    monitor = DriftMonitor(digits.reference, DriftConfig(), SHAPE)
    x, conf = draw(digits, 4, seed=12)
    with pytest.raises(InputError, match=r"samples of shape \[8, 8, 1\]"):
        monitor.observe(x.reshape(4, 64), conf)
    with pytest.raises(InputError, match="one confidence each"):
        monitor.observe(x, conf[:3])
    with pytest.raises(InputError, match="finite confidences"):
        monitor.observe(x, np.array([0.5, np.nan, 0.5, 0.5]))
    assert monitor.samples == 0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"window": 5}, "window must be between 10 and 1000000 samples"),
        ({"hop": 30}, "hop must be a whole divisor of window"),
        ({"hop": 0}, "hop must be a whole divisor of window"),
        ({"psi_threshold": 0.0}, "psi_threshold must be a positive finite number"),
        ({"feature_threshold": float("inf")}, "feature_threshold must be a positive finite"),
        ({"cusum_threshold": -1.0}, "cusum_threshold must be a positive finite number"),
        ({"feature_std_floor": 0.0}, "feature_std_floor must be above 0 and at most 1"),
        ({"channel_stride": 0}, "channel_stride must be between 1 and 4096"),
        ({"cusum_slack": -0.1}, "cusum_slack must be between 0 and 10"),
        ({"rearm_ratio": 1.0}, "rearm_ratio must be above 0 and below 1"),
    ],
)
def test_config_bounds_are_enforced(fields: dict[str, Any], message: str) -> None:
    """Out-of-bounds settings are refused with one sentence naming the field, whether built
    in code or decoded from the daemon's TOML section."""
    with pytest.raises(ValueError, match=message):
        DriftConfig(**fields)
    with pytest.raises(msgspec.ValidationError, match=message):
        msgspec.convert(fields, DriftConfig)


def test_config_rejects_unknown_keys() -> None:
    """A misspelt key in [drift] is an error, not a silent default."""
    with pytest.raises(msgspec.ValidationError, match="unknown field `windw`"):
        msgspec.convert({"windw": 100}, DriftConfig)
