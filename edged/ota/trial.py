"""The health trial a newly switched model must pass to become the known good one. Pure: values
in, a verdict out, the clock's readings passed in; the daemon does the feeding and the acting.

    swap ─► canaries: share of the bundle's canaries still giving the manifest's top-1
            below canary_min_agreement ─────────────────────────────────► rollback
         ─► watch live traffic for watch_s (Watch.result / Watch.error per sample):
            once min_watch_samples are in, any of
              inference errors / samples      > max_error_rate
              previous mean confidence − mean > max_confidence_drop
              median latency / previous       > max_latency_ratio ──────► rollback
            watch_s over with none of them ─────────────────────────────► commit
            otherwise ──────────────────────────────────────────────────► watch

"Previous" is the `Baseline` that `Traffic` measured on the model being replaced, just before
the switch (kept in the trial record, so a restart mid-trial compares against the same
figures). Without enough traffic on either side a comparison is skipped, and a watch that saw
fewer than min_watch_samples commits on its canaries alone; the verdict's reason says so.

The default canary_min_agreement is 1.0: the packer picks as canaries the held-out samples with
the widest top-1 margin, labelled by the model itself, so any runtime that executes the model
correctly agrees on all of them; one miss means a broken model or runtime, not rounding.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from edged.config import UpdateConfig

__all__ = [
    "Baseline",
    "InstallOutcome",
    "Traffic",
    "TrialPolicy",
    "Verdict",
    "Watch",
    "canary_verdict",
]

Action = Literal["commit", "rollback", "watch"]


@dataclass(frozen=True, slots=True)
class TrialPolicy:
    canary_min_agreement: float = 1.0
    watch_s: float = 300.0
    min_watch_samples: int = 50
    max_error_rate: float = 0.05
    max_confidence_drop: float = 0.1
    max_latency_ratio: float = 2.0

    @classmethod
    def from_config(cls, config: UpdateConfig) -> TrialPolicy:
        return cls(
            config.canary_min_agreement,
            config.watch_s,
            config.min_watch_samples,
            config.max_error_rate,
            config.max_confidence_drop,
            config.max_latency_ratio,
        )


@dataclass(frozen=True, slots=True)
class Baseline:
    """The replaced model's live figures; None where it served no traffic."""

    samples: int = 0
    mean_confidence: float | None = None
    latency_p50_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "mean_confidence": self.mean_confidence,
            "latency_p50_ms": self.latency_p50_ms,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Baseline:
        """Tolerant: what cannot be read is treated as not measured."""

        def number(key: str) -> float | None:
            value = d.get(key)
            return float(value) if isinstance(value, int | float) else None

        samples = d.get("samples")
        return cls(samples if isinstance(samples, int) else 0, number("mean_confidence"),
                   number("latency_p50_ms"))  # fmt: skip


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class InstallOutcome:
    """What `Daemon.install` did: "committed" (the new model is the known good one),
    "rolled_back" (it was switched to and failed; the known good one serves again) or
    "refused" (never switched to; nothing changed but possibly the inactive slot's file)."""

    result: Literal["committed", "rolled_back", "refused"]
    version: str
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)


def canary_verdict(agreement: float, policy: TrialPolicy) -> Verdict:
    """Rollback when too few canaries agree with the manifest, else go on to the watch."""
    figures = {"canary_agreement": round(agreement, 4)}
    if agreement < policy.canary_min_agreement:
        return Verdict(
            "rollback",
            f"canaries: {agreement:.0%} agree with the manifest, below the "
            f"{policy.canary_min_agreement:.0%} required",
            figures,
        )
    return Verdict("watch", "canaries passed", figures)


class Traffic:
    """The serving model's most recent results (confidence, latency), for a Baseline."""

    def __init__(self, capacity: int = 1024) -> None:
        self._recent: deque[tuple[float, float]] = deque(maxlen=capacity)

    def add(self, confidence: float, latency_ms: float) -> None:
        self._recent.append((confidence, latency_ms))

    def clear(self) -> None:
        self._recent.clear()

    def baseline(self) -> Baseline:
        if not self._recent:
            return Baseline()
        confidences, latencies = zip(*self._recent, strict=True)
        return Baseline(
            len(self._recent), statistics.fmean(confidences), statistics.median(latencies)
        )


class Watch:
    """The live-traffic half of a trial, started at clock reading `started`."""

    def __init__(
        self, policy: TrialPolicy, baseline: Baseline, started: float, capacity: int = 4096
    ) -> None:
        self.policy, self.baseline, self.started = policy, baseline, started
        self.results = 0
        self.errors = 0
        self._confidence_sum = 0.0
        self._latencies: deque[float] = deque(maxlen=capacity)

    def result(self, confidence: float, latency_ms: float) -> None:
        self.results += 1
        self._confidence_sum += confidence
        self._latencies.append(latency_ms)

    def error(self, count: int = 1) -> None:
        self.errors += count

    def figures(self, now: float) -> dict[str, Any]:
        """Flat figures, named as the rollout criteria read them (docs/ota.md); None where
        not measured."""
        samples = self.results + self.errors
        base = self.baseline
        mean = self._confidence_sum / self.results if self.results else None
        p50 = statistics.median(self._latencies) if self._latencies else None
        ratio = p50 / base.latency_p50_ms if p50 is not None and base.latency_p50_ms else None
        return {
            "watched_s": round(now - self.started, 3),
            "samples": samples,
            "error_rate": _round(self.errors / samples if samples else None),
            "confidence_before": _round(base.mean_confidence),
            "confidence_after": _round(mean),
            "latency_before_ms": _round(base.latency_p50_ms),
            "latency_after_ms": _round(p50),
            "latency_ratio": _round(ratio),
            "baseline_samples": base.samples,
        }

    def verdict(self, now: float) -> Verdict:
        p, base = self.policy, self.baseline
        figures = self.figures(now)
        samples = self.results + self.errors
        enough = p.min_watch_samples
        if samples >= enough and self.errors / samples > p.max_error_rate:
            return Verdict(
                "rollback",
                f"inference errors: {self.errors} of {samples} samples "
                f"({self.errors / samples:.1%}, max {p.max_error_rate:.1%})",
                figures,
            )
        if self.results >= enough and base.samples >= enough:
            mean = self._confidence_sum / self.results
            if base.mean_confidence is not None and base.mean_confidence - mean > (
                p.max_confidence_drop
            ):
                return Verdict(
                    "rollback",
                    f"confidence: mean {mean:.3f} against {base.mean_confidence:.3f} before "
                    f"(drop over {p.max_confidence_drop})",
                    figures,
                )
            p50 = statistics.median(self._latencies)
            if base.latency_p50_ms and p50 / base.latency_p50_ms > p.max_latency_ratio:
                return Verdict(
                    "rollback",
                    f"latency: median {p50:.2f} ms against {base.latency_p50_ms:.2f} ms "
                    f"before (over {p.max_latency_ratio}x)",
                    figures,
                )
        if now - self.started >= p.watch_s:
            if samples < enough:
                reason = f"canaries passed; only {samples} live samples in {p.watch_s:g} s"
            elif base.samples < enough:
                reason = f"{samples} live samples healthy; no baseline from the previous model"
            else:
                reason = f"{samples} live samples healthy over {p.watch_s:g} s"
            return Verdict("commit", reason, figures)
        return Verdict("watch", "watching", figures)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
