"""The on-device confidence gate, pure: probabilities in, one verdict per row out.

A row whose score (`edged_formats.scores`: higher = more confident) is at least the threshold
of its predicted class is CONFIDENT and acted on locally; below it, UNCERTAIN: kept and offered
to the upload budget (`edged.sample_budget`). A random `audit_rate` share of confident rows is
AUDIT instead: acted on locally and offered to the budget too, so the cloud can estimate field
accuracy without bias. The global threshold is fixed, or derived from the bundle's reference
quantiles ("flag the least confident q share seen on validation"); per-class fixed thresholds
override it by label. docs/gating.md has the details and defaults.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from edged.sample_budget import (
    GatingCounters,
    Suppressed,
    UploadBudget,
    UploadBudgetConfig,
    signature_of,
)
from edged_formats import Manifest
from edged_formats.scores import ScoreName, score

__all__ = [
    "AUDIT",
    "CONFIDENT",
    "DEFAULT_REFERENCE_QUANTILE",
    "UNCERTAIN",
    "VERDICT_NAMES",
    "Gate",
    "GateBatch",
    "GatingConfig",
    "GatingCounters",
    "Suppressed",
    "UploadBudget",
    "UploadBudgetConfig",
    "check_fits",
    "derived_threshold",
    "signature_of",
]

DEFAULT_REFERENCE_QUANTILE = 0.05


# Verdict codes, one per row of GateBatch.verdicts. AUDIT rows are confident rows (acted on
# locally) that are also offered for upload.
CONFIDENT = 0
UNCERTAIN = 1
AUDIT = 2
VERDICT_NAMES = ("confident", "uncertain", "audit")


def _unit(value: float) -> bool:
    return math.isfinite(value) and 0.0 <= value <= 1.0


class GatingConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """TOML section `[gating]` (its budget is `[gating.budget]`). Set `threshold` for a fixed
    threshold; otherwise it is derived at `reference_quantile` (0.05 when unset). Setting both
    is refused. `per_class` maps labels to fixed thresholds that override the global one."""

    score: ScoreName = "max_probability"
    threshold: float | None = None
    reference_quantile: float | None = None
    per_class: dict[str, float] = {}
    audit_rate: float = 0.01
    budget: UploadBudgetConfig = msgspec.field(default_factory=UploadBudgetConfig)

    def __post_init__(self) -> None:
        if self.threshold is not None and self.reference_quantile is not None:
            raise ValueError("threshold must not be set together with reference_quantile")
        if self.threshold is not None and not _unit(self.threshold):
            raise ValueError("threshold must be between 0 and 1")
        if self.reference_quantile is not None and not 0.0 < self.reference_quantile < 1.0:
            raise ValueError("reference_quantile must be strictly between 0 and 1")
        for label, value in self.per_class.items():
            if not _unit(value):
                raise ValueError(f"per_class threshold of '{label}' must be between 0 and 1")
        if not _unit(self.audit_rate):
            raise ValueError("audit_rate must be between 0 and 1")

    @property
    def quantile(self) -> float | None:
        """The reference quantile the threshold derives from; None for a fixed threshold."""
        if self.threshold is not None:
            return None
        return self.reference_quantile or DEFAULT_REFERENCE_QUANTILE


@dataclass(frozen=True, slots=True)
class GateBatch:
    """Verdicts for one batch, every array one entry per row."""

    scores: npt.NDArray[np.float32]
    thresholds: npt.NDArray[np.float32]
    verdicts: npt.NDArray[np.int8]
    top1: npt.NDArray[np.intp]

    def kept(self) -> npt.NDArray[np.intp]:
        """Rows to offer for upload (UNCERTAIN and AUDIT), in order."""
        return np.flatnonzero(self.verdicts != CONFIDENT)


def derived_threshold(manifest: Manifest, score_name: ScoreName, quantile: float) -> float:
    """The reference score at `quantile`, linearly interpolated between the two nearest
    quantiles of the bundle's table; ValueError outside the table or without one."""
    ref = manifest.reference
    table = (
        ref.confidence_quantiles
        if score_name == "max_probability"
        else ref.score_quantiles.get(score_name, {})
    )
    try:
        points = sorted((float(k), float(v)) for k, v in table.items())
    except ValueError:
        points = []
    if not points:
        raise ValueError(
            f"the bundle has no reference quantiles for the {score_name} score; "
            "set a fixed threshold"
        )
    qs = [q for q, _ in points]
    if not qs[0] <= quantile <= qs[-1]:
        raise ValueError(
            f"reference_quantile {quantile:g} is outside the bundle's {score_name} quantiles "
            f"({qs[0]:g} to {qs[-1]:g}); pick one inside or set a fixed threshold"
        )
    return float(np.interp(quantile, qs, [v for _, v in points]))


def check_fits(config: GatingConfig, manifest: Manifest, labels: Sequence[str]) -> None:
    """ValueError, in one sentence, when `config` cannot gate this model's outputs (a
    per-class label it lacks, a reference quantile outside its table, no quantiles)."""
    Gate(config, manifest, labels, np.random.default_rng(0))


class Gate:
    """Built per model (rebuilt on a model swap or reload); `decide` gates a batch.

    `counters` may be shared with the UploadBudget so one object reports every outcome."""

    def __init__(
        self,
        config: GatingConfig,
        manifest: Manifest,
        labels: Sequence[str],
        rng: np.random.Generator,
        counters: GatingCounters | None = None,
    ) -> None:
        classes = manifest.output.num_classes
        if len(labels) != classes:
            raise ValueError(f"the model has {classes} classes but {len(labels)} labels")
        index = {label: i for i, label in enumerate(labels)}
        unknown = sorted(set(config.per_class) - set(index))
        if unknown:
            raise ValueError(
                f"gating.per_class names '{unknown[0]}', which is not a label of model "
                f"{manifest.name} {manifest.version}"
            )
        quantile = config.quantile
        base = (
            derived_threshold(manifest, config.score, quantile)
            if quantile is not None
            else float(config.threshold or 0.0)
        )
        thresholds = np.full(classes, base, dtype=np.float32)
        for label, value in config.per_class.items():
            thresholds[index[label]] = value
        self.config = config
        self.classes = classes
        self.threshold = base
        self.class_thresholds: Mapping[str, float] = {
            label: float(thresholds[i]) for label, i in index.items()
        }
        self.counters = counters if counters is not None else GatingCounters()
        self._thresholds = thresholds
        self._rng = rng

    def decide(self, probabilities: npt.NDArray[Any]) -> GateBatch:
        """Verdicts for a batch of probability rows [n, classes]; NaN scores are UNCERTAIN."""
        p = np.asarray(probabilities, dtype=np.float32)
        if p.ndim != 2 or p.shape[1] != self.classes:
            raise ValueError(f"probabilities must be [n, {self.classes}], not {list(p.shape)}")
        top1 = p.argmax(axis=1)
        scores = score(self.config.score, p)
        thresholds = self._thresholds[top1]
        uncertain = ~(scores >= thresholds)
        verdicts = uncertain.astype(np.int8)
        n = len(p)
        audits = 0
        if self.config.audit_rate > 0 and n:
            audit = (self._rng.random(n) < self.config.audit_rate) & ~uncertain
            verdicts[audit] = AUDIT
            audits = int(np.count_nonzero(audit))
        kept = int(np.count_nonzero(uncertain))
        counters = self.counters
        counters.uncertain += kept
        counters.audit += audits
        counters.confident += n - kept - audits
        return GateBatch(scores=scores, thresholds=thresholds, verdicts=verdicts, top1=top1)
