"""Measure the drift defaults on real data (scikit-learn's digits), for docs/drift.md.

Reference statistics come from the validation split with a logistic regression's confidences,
as the packer measures them; live streams are bootstrap draws from the held-out test split,
clean or drifted. Prints score quantiles on clean data, false alarms per 10,000 clean samples,
detection delays after a drift starts, and the cost of `observe` per sample.

    .venv/bin/python scripts/drift_calibration.py
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.ndimage import rotate
from sklearn.linear_model import LogisticRegression

from control_plane.toolchain.datasets import digits_dataset
from edged.drift import DriftConfig, DriftMonitor
from edged_formats import ConfidenceHistogram, ReferenceStats

RNG = np.random.default_rng(0)


def model_and_reference() -> tuple[Any, Any, Any]:
    data = digits_dataset()
    model = LogisticRegression(max_iter=2000).fit(
        data.x_train.reshape(len(data.x_train), -1), data.y_train
    )
    val_conf = model.predict_proba(data.x_val.reshape(len(data.x_val), -1)).max(axis=1)
    return data, model, reference(data.x_val, val_conf)


def reference(raw: npt.NDArray[Any], confidence: npt.NDArray[Any]) -> ReferenceStats:
    """As the packer measures it: element features of the raw input, 20 confidence bins."""
    features = raw.astype(np.float64).reshape(len(raw), -1)
    counts, _ = np.histogram(confidence, bins=20, range=(0.0, 1.0))
    return ReferenceStats(
        granularity="element",
        feature_mean=tuple(features.mean(axis=0).tolist()),
        feature_std=tuple(features.std(axis=0).tolist()),
        confidence_histogram=ConfidenceHistogram(tuple(counts.tolist())),
        confidence_quantiles={},
        samples=len(raw),
    )


def rotated(x: npt.NDArray[Any], degrees: float) -> npt.NDArray[np.uint8]:
    out = rotate(x.astype(np.float64), degrees, axes=(1, 2), reshape=False, order=1)
    return np.clip(np.rint(out), 0, 16).astype(np.uint8)


def noisy(x: npt.NDArray[Any], sigma: float) -> npt.NDArray[np.uint8]:
    out = x + RNG.normal(0, sigma, x.shape)
    return np.clip(np.rint(out), 0, 16).astype(np.uint8)


def confidences(model: Any, x: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    return model.predict_proba(x.reshape(len(x), -1)).max(axis=1)


def stream(x, conf, n):
    idx = RNG.integers(0, len(x), n)
    return x[idx], conf[idx]


def feed(monitor, x, conf, batch=16):
    alarms = []
    for i in range(0, len(x), batch):
        alarms += monitor.observe(x[i : i + batch], conf[i : i + batch])
    return alarms


def main() -> None:
    data, model, ref = model_and_reference()
    print("reference confidence hist", ref.confidence_histogram.counts)
    cfg = DriftConfig()
    x_test, c_test = data.x_test, confidences(model, data.x_test)
    print(
        "test mean conf",
        c_test.mean(),
        "val-ref mean",
        DriftMonitor(ref, cfg, (8, 8, 1)).reference_confidence,
    )

    # Null: long clean stream, record scores per window.
    mon = DriftMonitor(ref, cfg, (8, 8, 1))
    psi, feat, cus = [], [], []
    n_null = 100_000
    xs, cs = stream(x_test, c_test, n_null)
    alarms = []
    for i in range(0, n_null, 50):
        alarms += mon.observe(xs[i : i + 50], cs[i : i + 50])
        if mon.windows:
            psi.append(mon.scores["confidence_psi"])
            feat.append(mon.scores["feature_shift"])
        cus.append(mon.scores["confidence_cusum"])
    for name, values in (("psi", psi), ("feature", feat), ("cusum", cus)):
        print(
            name,
            "null quantiles 50/99/99.9/max",
            np.quantile(values, [0.5, 0.99, 0.999, 1.0]).round(4),
        )
    counts = {
        k: sum(a.kind == k for a in alarms)
        for k in ("confidence_psi", "feature_shift", "confidence_cusum")
    }
    print("false alarms per 10k clean samples", {k: v * 10_000 / n_null for k, v in counts.items()})

    # Delays: 1000 to 1049 clean samples, then drifted; first alarm of each kind after the switch.
    drifts = {
        "rotate 15": (lambda x: rotated(x, 15), None),
        "rotate 30": (lambda x: rotated(x, 30), None),
        "noise 2": (lambda x: noisy(x, 2), None),
        "noise 4": (lambda x: noisy(x, 4), None),
        "conf -0.1": (None, lambda c: np.maximum(c - 0.1, 0.1)),
        "conf -0.05": (None, lambda c: np.maximum(c - 0.05, 0.1)),
    }
    for name, (fx, fc) in drifts.items():
        delays: dict[str, list[int]] = {}
        for _ in range(50):
            mon = DriftMonitor(ref, cfg, (8, 8, 1))
            start = 1000 + int(RNG.integers(0, cfg.hop))  # anywhere in a hop
            x0, c0 = stream(x_test, c_test, start)
            feed(mon, x0, c0)
            x1, c1 = stream(x_test, c_test, 2000)
            if fx is not None:
                x1 = fx(x1)
                c1 = confidences(model, x1)
            if fc is not None:
                c1 = fc(c1)
            seen = set()
            for a in feed(mon, x1, c1):
                if a.kind not in seen:
                    seen.add(a.kind)
                    delays.setdefault(a.kind, []).append(a.samples - start)
        summary = {k: (len(v), int(np.median(v)), int(np.max(v))) for k, v in delays.items()}
        print(
            name,
            "mean conf",
            round(float(c1.mean()), 3),
            "kind: (runs/50, median, max delay)",
            summary,
        )

    # Cost per sample.
    for batch in (1, 8, 64):
        mon = DriftMonitor(ref, cfg, (8, 8, 1))
        xs, cs = stream(x_test, c_test, 20_000)
        t = time.perf_counter()
        feed(mon, xs, cs, batch)
        print(
            f"batch {batch}: {(time.perf_counter() - t) / 20_000 * 1e6:.2f} us/sample (64 elements)"
        )
    img_ref = ReferenceStats(
        "channel", (120.0,) * 3, (60.0,) * 3, ConfidenceHistogram((1,) * 20), {}, 100
    )
    imgs = RNG.integers(0, 256, (64, 224, 224, 3), dtype=np.uint8)
    mon = DriftMonitor(img_ref, cfg, (224, 224, 3))
    t = time.perf_counter()
    for _ in range(10):
        mon.observe(imgs, RNG.random(64))
    per_sample = (time.perf_counter() - t) / 640 * 1e6
    print(f"224x224x3 stride {cfg.channel_stride}: {per_sample:.1f} us/sample")


if __name__ == "__main__":
    main()
