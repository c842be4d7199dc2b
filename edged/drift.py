"""Drift statistics on the device, pure: raw inputs and confidences in, alarms out.

`DriftMonitor.observe(raw, confidence)` compares live traffic with the bundle's
`ReferenceStats` three ways and returns the alarms newly raised:

- `confidence_psi`: population stability index between the reference confidence histogram
  and the histogram of the last `window` samples (same equal bins over [0, 1]);
- `feature_shift`: mean over features of the symmetric KL divergence between the Gaussians
  N(reference mean, std) and N(window mean, std) of each input feature;
- `confidence_cusum`: a one-sided CUSUM on every sample's confidence, for a drop below the
  reference mean.

Windows slide by `hop` samples and keep running sums only (no samples are stored). Each
kind alarms once, then re-arms when its score falls below `rearm_ratio` times its threshold
(the CUSUM only once its statistic is back at zero: it wanders too much to re-arm earlier).
docs/drift.md has the formulas, the defaults and the detection delays measured on real data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
import numpy as np
import numpy.typing as npt

from edged.errors import InputError, ModelError
from edged_formats import ReferenceStats

__all__ = ["AlarmKind", "DriftAlarm", "DriftConfig", "DriftMonitor"]

AlarmKind = Literal["confidence_psi", "feature_shift", "confidence_cusum"]
KINDS: tuple[AlarmKind, ...] = ("confidence_psi", "feature_shift", "confidence_cusum")
PSEUDOCOUNT = 0.5  # added to every histogram bin (live and reference) before the PSI
CUSUM_CEILING = 2.0  # the CUSUM statistic is capped at this many thresholds
CUSUM_CLIP = 3.0  # one sample moves the CUSUM by at most this many reference stds
MIN_STD = 1e-6  # the feature std floor when every reference feature is constant

Float64Array = npt.NDArray[np.float64]


class DriftConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The `[drift]` section: window sizes in samples, thresholds on the scores of
    docs/drift.md. `window` must be a multiple of `hop`."""

    enabled: bool = True
    window: int = 200
    hop: int = 50
    psi_threshold: float = 0.25
    feature_threshold: float = 0.5
    feature_std_floor: float = 0.1
    channel_stride: int = 16
    cusum_slack: float = 0.5
    cusum_threshold: float = 10.0
    rearm_ratio: float = 0.8

    def __post_init__(self) -> None:
        if not 10 <= self.window <= 1_000_000:
            raise ValueError("window must be between 10 and 1000000 samples")
        if not 1 <= self.hop <= self.window or self.window % self.hop:
            raise ValueError("hop must be a whole divisor of window")
        for name in ("psi_threshold", "feature_threshold", "cusum_threshold"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number")
        if not 0 < self.feature_std_floor <= 1:
            raise ValueError("feature_std_floor must be above 0 and at most 1")
        if not 1 <= self.channel_stride <= 4096:
            raise ValueError("channel_stride must be between 1 and 4096")
        if not 0 <= self.cusum_slack <= 10:
            raise ValueError("cusum_slack must be between 0 and 10")
        if not 0 < self.rearm_ratio < 1:
            raise ValueError("rearm_ratio must be above 0 and below 1")


@dataclass(frozen=True, slots=True)
class DriftAlarm:
    """One threshold crossing: `samples` counts samples observed since start or reset, up
    to and including the one that raised it."""

    kind: AlarmKind
    score: float
    threshold: float
    samples: int


class DriftMonitor:
    """Running drift statistics for one model; `observe` after every inference batch."""

    def __init__(
        self, reference: ReferenceStats, config: DriftConfig, sample_shape: tuple[int, ...]
    ) -> None:
        self.config = config
        self.reset(reference, sample_shape)

    def reconfigure(self, config: DriftConfig) -> None:
        """New settings for the same model. Windows, scores and active alarms carry over
        (new thresholds apply from the next sample) unless `window`, `hop` or
        `channel_stride` change, which start everything again."""
        old, self.config = self.config, config
        self._load(self._reference, self._sample_shape)
        if (old.enabled, old.window, old.hop, old.channel_stride) != (
            config.enabled,
            config.window,
            config.hop,
            config.channel_stride,
        ):
            self._clear()

    def reset(self, reference: ReferenceStats, sample_shape: tuple[int, ...]) -> None:
        """Start again from nothing against `reference` (a model swap); ModelError when the
        reference does not fit samples of `sample_shape`."""
        self._load(reference, sample_shape)
        self._clear()

    def _load(self, reference: ReferenceStats, sample_shape: tuple[int, ...]) -> None:
        """What the reference and the configuration fix: floors, reference shares, steps."""
        cfg, shape = self.config, tuple(sample_shape)
        features = len(reference.feature_mean)
        expected = 0 if not shape else shape[-1]
        if reference.granularity == "element":
            expected = math.prod(shape)
        if expected != features:
            raise ModelError(
                f"the reference has {features} {reference.granularity} features but samples "
                f"of shape {list(shape)} have {expected}"
            )
        self._reference, self._sample_shape = reference, shape
        pixels = math.prod(shape[:-1]) if reference.granularity == "channel" else 1
        self._stride = cfg.channel_stride if reference.granularity == "channel" else 1
        self._rows = len(range(0, pixels, self._stride))  # feature rows per sample
        std = np.asarray(reference.feature_std, dtype=np.float64)
        self._floor = max(cfg.feature_std_floor * float(std.mean()), MIN_STD)
        self._ref_mean = np.asarray(reference.feature_mean, dtype=np.float64)
        self._ref_var = np.maximum(std, self._floor) ** 2
        self._load_confidence(reference.confidence_histogram.counts)
        self._features = features
        self._ones = np.ones(self._rows, dtype=np.float32)

    def _clear(self) -> None:
        """Empty windows, zero scores and counters, nothing active."""
        cfg, features = self.config, self._features
        blocks = cfg.window // cfg.hop
        self._ring_s1 = np.zeros((blocks, features))
        self._ring_s2 = np.zeros((blocks, features))
        self._ring_hist = np.zeros((blocks, self._bins))
        width = features if self._reference.granularity == "element" else 2 * features
        self._block = np.zeros((cfg.hop, width))
        self._block_bins = np.zeros(cfg.hop, dtype=np.intp)
        self._block_n = 0
        self._blocks_done = 0
        self.samples = 0
        self.windows = 0
        self.scores: dict[AlarmKind, float] = dict.fromkeys(KINDS, 0.0)
        self.active: dict[AlarmKind, bool] = dict.fromkeys(KINDS, False)
        self.window_confidence = 0.0

    def _load_confidence(self, histogram: tuple[int, ...]) -> None:
        """PSI reference shares, and the CUSUM step of each bin: the reference mean and std
        are those of bin centres, so a live confidence is compared at its bin centre too."""
        counts = np.asarray(histogram, dtype=np.float64)
        self._bins = len(counts)
        self._ref_p = (counts + PSEUDOCOUNT) / (counts.sum() + PSEUDOCOUNT * self._bins)
        self._centres = (np.arange(self._bins) + 0.5) / self._bins
        shares = counts / counts.sum()
        self.reference_confidence = float(shares @ self._centres)
        variance = float(shares @ self._centres**2) - self.reference_confidence**2
        sigma = max(math.sqrt(max(variance, 0.0)), 1.0 / self._bins)
        deviation = (self.reference_confidence - self._centres) / sigma
        steps = np.clip(deviation, -CUSUM_CLIP, CUSUM_CLIP) - self.config.cusum_slack
        self._cusum_steps: list[float] = steps.tolist()

    def observe(self, raw: npt.NDArray[Any], confidence: npt.NDArray[Any]) -> list[DriftAlarm]:
        """Account for a batch (`raw` [n, *sample_shape], top-1 `confidence` [n]); the
        alarms it raised, in the order they were raised. Nothing while `enabled` is off."""
        if not self.config.enabled:
            return []
        raw = np.asarray(raw)
        conf: list[float] = np.asarray(confidence, dtype=np.float64).reshape(-1).tolist()
        if raw.shape[1:] != self._sample_shape or len(raw) != len(conf):
            raise InputError(
                f"drift statistics need samples of shape {list(self._sample_shape)} with one "
                f"confidence each, got {list(raw.shape)} and {len(conf)} confidences"
            )
        last = self._bins - 1
        try:
            bins = [min(max(int(c * self._bins), 0), last) for c in conf]
        except (ValueError, OverflowError) as exc:
            raise InputError("drift statistics need finite confidences") from exc
        moments = self._moments(raw)
        alarms: list[DriftAlarm] = []
        start, hop = 0, self.config.hop
        while start < len(bins):
            end = min(len(bins), start + hop - self._block_n)
            self._cusum(bins[start:end], alarms)
            fill = slice(self._block_n, self._block_n + end - start)
            self._block[fill] = moments[start:end]
            self._block_bins[fill] = bins[start:end]
            self._block_n += end - start
            self.samples += end - start
            if self._block_n == hop:
                self._close_block(alarms)
            start = end
        return alarms

    def summary(self) -> dict[str, float | int | bool]:
        """Compact telemetry: counters, the latest scores and which alarms are active."""
        out: dict[str, float | int | bool] = {
            "enabled": self.config.enabled,
            "samples": self.samples,
            "windows": self.windows,
        }
        out["reference_confidence"] = round(self.reference_confidence, 4)
        out["window_confidence"] = round(self.window_confidence, 4)
        for kind in KINDS:
            out[kind] = round(self.scores[kind], 4)
            out[f"{kind}_alarm"] = self.active[kind]
        return out

    def _moments(self, raw: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """One row per sample: its elements ("element"), or the sums of its channels and of
        their squares over every `channel_stride`-th pixel ("channel")."""
        if self._reference.granularity == "element":
            return raw.reshape(len(raw), -1)
        channels = self._sample_shape[-1]
        pixels = raw.reshape(len(raw), -1, channels)[:, :: self._stride].astype(np.float32)
        return np.concatenate((self._ones @ pixels, self._ones @ (pixels * pixels)), axis=1)

    def _cusum(self, bins: list[int], alarms: list[DriftAlarm]) -> None:
        """S = min(ceiling, max(0, S + step[bin of c])) for each sample in turn."""
        threshold = self.config.cusum_threshold
        ceiling = CUSUM_CEILING * threshold
        stat, active = self.scores["confidence_cusum"], self.active["confidence_cusum"]
        steps = self._cusum_steps
        for seen, b in enumerate(bins, start=1):
            stat = min(ceiling, max(0.0, stat + steps[b]))
            if active and stat == 0.0:  # back in control, not a dip in a lasting drift
                active = False
            elif not active and stat >= threshold:
                active = True
                sample = self.samples + seen
                alarms.append(DriftAlarm("confidence_cusum", stat, threshold, sample))
        self.scores["confidence_cusum"], self.active["confidence_cusum"] = stat, active

    def _close_block(self, alarms: list[DriftAlarm]) -> None:
        """Fold the finished block into the ring of block sums; score once the ring is full."""
        slot, block, features = self._blocks_done % len(self._ring_s1), self._block, self._features
        if self._reference.granularity == "element":
            self._ring_s1[slot] = block.sum(axis=0)
            self._ring_s2[slot] = np.einsum("ij,ij->j", block, block)
        else:
            sums = block.sum(axis=0)
            self._ring_s1[slot], self._ring_s2[slot] = sums[:features], sums[features:]
        self._ring_hist[slot] = np.bincount(self._block_bins, minlength=self._bins)
        self._block_n = 0
        self._blocks_done += 1
        if self._blocks_done >= len(self._ring_s1):
            self.windows += 1
            self._evaluate(alarms)

    def _evaluate(self, alarms: list[DriftAlarm]) -> None:
        """Score the full window and apply each kind's threshold with hysteresis."""
        cfg = self.config
        count = cfg.window * self._rows
        mean = self._ring_s1.sum(axis=0) / count
        var = np.maximum(self._ring_s2.sum(axis=0) / count - mean**2, self._floor**2)
        ratio = var / self._ref_var
        gap = (mean - self._ref_mean) ** 2
        divergence = 0.5 * (ratio + 1 / ratio) - 1 + 0.5 * gap * (1 / var + 1 / self._ref_var)
        hist = self._ring_hist.sum(axis=0)
        live_p = (hist + PSEUDOCOUNT) / (cfg.window + PSEUDOCOUNT * self._bins)
        psi = float(np.sum((live_p - self._ref_p) * np.log(live_p / self._ref_p)))
        self.window_confidence = float(hist @ self._centres) / cfg.window
        self._judge("confidence_psi", psi, cfg.psi_threshold, alarms)
        self._judge("feature_shift", float(divergence.mean()), cfg.feature_threshold, alarms)

    def _judge(
        self, kind: AlarmKind, score: float, threshold: float, alarms: list[DriftAlarm]
    ) -> None:
        self.scores[kind] = score
        if self.active[kind] and score < self.config.rearm_ratio * threshold:
            self.active[kind] = False
        elif not self.active[kind] and score >= threshold:
            self.active[kind] = True
            alarms.append(DriftAlarm(kind, score, threshold, self.samples))
