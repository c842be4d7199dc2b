"""The official toolchain (torch -> litert-torch -> ai-edge-quantizer -> bundle) on real data:
the issue's acceptance figures, measured on held-out samples."""

from __future__ import annotations

import numpy as np
import pytest

from edged.engine import Engine, open_bundle

pytestmark = [pytest.mark.train, pytest.mark.slow]


def test_int8_agrees_with_torch_and_is_small(digits_build) -> None:
    """int8 agrees with torch on >= 99 % of held-out digits, loses <= 1 point, and the file
    is <= 30 % of the float32 export."""
    _, report = digits_build
    assert report.test_samples == 360
    assert report.top1_agreement >= 0.99
    assert report.accuracy_loss_pts <= 1.0
    assert report.size_ratio <= 0.30
    assert report.torch_accuracy >= 0.95


def test_bundle_is_fine_tunable_and_self_describing(digits_build) -> None:
    """The bundle exposes the embedding, ships the float head and a balanced replay set of
    50 raw training digits per class, and its head applied to the engine's int8 embeddings
    reproduces the engine's own top-1."""
    out, report = digits_build
    engine = Engine.from_file(out / report.bundle)
    manifest = engine.manifest
    assert manifest.input.dtype == "int8" and manifest.input.scale == 1 / 16
    assert manifest.embedding is not None and manifest.embedding.size == 64
    assert manifest.metrics["int8_torch_agreement"] == report.top1_agreement
    with np.load(out / "digits-test.npz") as data:
        x, y = data["x"], data["y"]
    assert x.dtype == np.uint8  # raw pixels as a device sees them, served through the LUT
    prediction = engine.predict(x)
    assert np.mean(prediction.top1 == y) == pytest.approx(report.int8_accuracy, abs=1e-4)
    weight, bias = open_bundle(out / report.bundle).head_weights()
    head_top1 = np.argmax(prediction.embeddings @ weight.T + bias, axis=1)
    assert np.mean(head_top1 == prediction.top1) >= 0.97
    assert engine.canary_agreement() == 1.0
    assert sum(manifest.reference.confidence_histogram.counts) == manifest.reference.samples
    replay_x, replay_y = open_bundle(out / report.bundle).replay()
    assert manifest.replay is not None and manifest.replay.member == "replay.npz"
    assert replay_x.dtype == np.uint8 and replay_x.shape == (500, 8, 8, 1)
    assert np.bincount(replay_y).tolist() == [50] * 10
    assert np.mean(engine.predict(replay_x).top1 == replay_y) >= 0.95  # seen in training


def test_sensor_model_on_unseen_subjects(sensor_build) -> None:
    """The 1-D CNN on real smartwatch IMU windows (subjects never seen in training): int8
    agrees with torch on 99 % of windows, stays within a point of it, and the file within
    30 % of float. Training is seeded, but float rounding differs between CPUs, so another
    processor trains another model: on an Intel Xeon seeds 0-4 gave 99.42-99.61 % (at most
    5 of the 514 windows may flip)."""
    out, report = sensor_build
    assert report.test_samples == 514
    assert report.torch_accuracy >= 0.85
    assert report.accuracy_loss_pts <= 1.0
    assert report.top1_agreement >= 0.99
    assert report.size_ratio <= 0.30
    engine = Engine.from_file(out / report.bundle)
    assert engine.manifest.input.layout == "NLC" and engine.sample_shape == (100, 6)
    assert engine.manifest.reference.granularity == "element"
    with np.load(out / "sensor-test.npz") as data:
        prediction = engine.predict(data["x"])
        accuracy = np.mean(prediction.top1 == data["y"])
    assert accuracy == pytest.approx(report.int8_accuracy, abs=1e-4)
    assert engine.canary_agreement() == 1.0
    replay_x, replay_y = open_bundle(out / report.bundle).replay()
    assert replay_x.dtype == np.float32 and replay_x.shape == (350, 100, 6)
    assert np.bincount(replay_y).tolist() == [50] * 7
