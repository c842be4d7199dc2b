"""The confidence gate: scores against thresholds, derived thresholds, per-class overrides and
the audit sample, with hand-computed verdicts."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import numpy as np
import pytest

from edged.gating import (
    AUDIT,
    CONFIDENT,
    UNCERTAIN,
    Gate,
    GatingConfig,
    GatingCounters,
    UploadBudgetConfig,
    derived_threshold,
)
from edged_formats import Manifest

from ..edged_formats.samples import manifest_dict

LABELS = [f"digit-{i}" for i in range(10)]


def manifest(**reference: Any) -> Manifest:
    obj = manifest_dict()
    obj["reference"].update(reference)
    return Manifest.from_dict(obj)


def rows(*tops: tuple[int, float, float]) -> np.ndarray:
    """Rows over 10 classes: `p1` on class `k`, `p2` on the next class, the rest spread evenly."""
    out = np.zeros((len(tops), 10), dtype=np.float32)
    for r, (k, p1, p2) in enumerate(tops):
        out[r, :] = (1.0 - p1 - p2) / 8
        out[r, k], out[r, (k + 1) % 10] = p1, p2
    return out


def gate(config: GatingConfig, m: Manifest | None = None, seed: int = 0) -> Gate:
    return Gate(config, m or manifest(), LABELS, np.random.default_rng(seed))


def test_fixed_threshold_splits_confident_from_uncertain() -> None:
    """Max probability at or above the threshold is confident, below it uncertain."""
    g = gate(GatingConfig(threshold=0.6, audit_rate=0.0))
    batch = g.decide(rows((3, 0.9, 0.05), (4, 0.6, 0.2), (5, 0.59, 0.3)))
    assert batch.top1.tolist() == [3, 4, 5]
    assert batch.scores.tolist() == pytest.approx([0.9, 0.6, 0.59])
    assert batch.thresholds.tolist() == pytest.approx([0.6] * 3)
    assert batch.verdicts.tolist() == [CONFIDENT, CONFIDENT, UNCERTAIN]
    assert batch.kept().tolist() == [2]


def test_margin_score_flags_close_calls() -> None:
    """With the margin score, 0.5 vs 0.45 (margin 0.05) is uncertain though its top-1 is high."""
    g = gate(GatingConfig(score="margin", threshold=0.2, audit_rate=0.0))
    batch = g.decide(rows((0, 0.5, 0.45), (1, 0.5, 0.1)))
    assert batch.scores.tolist() == pytest.approx([0.05, 0.4], abs=1e-6)
    assert batch.verdicts.tolist() == [UNCERTAIN, CONFIDENT]


def test_entropy_score_is_one_minus_normalised_entropy() -> None:
    """A one-hot row scores 1, a uniform row 0, and [.5, .5, 0...] 1 - log 2 / log 10."""
    probabilities = np.zeros((3, 10), dtype=np.float32)
    probabilities[0, 2] = 1.0
    probabilities[1, :] = 0.1
    probabilities[2, :2] = 0.5
    g = gate(GatingConfig(score="entropy", threshold=0.5, audit_rate=0.0))
    batch = g.decide(probabilities)
    expected = [1.0, 0.0, 1 - math.log(2) / math.log(10)]
    assert batch.scores.tolist() == pytest.approx(expected, abs=1e-6)
    assert batch.verdicts.tolist() == [CONFIDENT, UNCERTAIN, CONFIDENT]


def test_nan_rows_are_uncertain() -> None:
    """A row the model turned into NaN is kept for upload, never acted on as confident."""
    probabilities = rows((1, 0.9, 0.05))
    probabilities[0, 4] = np.nan
    batch = gate(GatingConfig(threshold=0.5, audit_rate=0.0)).decide(probabilities)
    assert batch.verdicts.tolist() == [UNCERTAIN]


def test_threshold_derives_from_the_reference_quantile() -> None:
    """By default the threshold is the bundle's top-1 probability at quantile 0.05."""
    g = gate(GatingConfig(audit_rate=0.0))
    assert g.threshold == pytest.approx(0.6)
    batch = g.decide(rows((0, 0.61, 0.1), (0, 0.59, 0.1)))
    assert batch.verdicts.tolist() == [CONFIDENT, UNCERTAIN]


def test_derived_threshold_interpolates_between_neighbours() -> None:
    """Quantile 0.075 between 0.05 → 0.6 and 0.1 → 0.7 gives 0.65; table ends are exact."""
    m = manifest(confidence_quantiles={"0.01": 0.3, "0.05": 0.6, "0.1": 0.7, "0.5": 0.95})
    assert derived_threshold(m, "max_probability", 0.075) == pytest.approx(0.65)
    assert derived_threshold(m, "max_probability", 0.01) == pytest.approx(0.3)
    assert derived_threshold(m, "max_probability", 0.5) == pytest.approx(0.95)


def test_derived_threshold_outside_the_table_is_refused() -> None:
    """A quantile beyond the bundle's table is refused in one sentence, not extrapolated."""
    with pytest.raises(ValueError, match=r"reference_quantile 0\.2 is outside .*0\.05 to 0\.05"):
        gate(GatingConfig(reference_quantile=0.2))


def test_score_quantiles_feed_margin_and_entropy_thresholds() -> None:
    """Margin and entropy thresholds come from the bundle's score_quantiles."""
    m = manifest(score_quantiles={"margin": {"0.05": 0.25}, "entropy": {"0.05": 0.4}})
    assert gate(GatingConfig(score="margin"), m).threshold == pytest.approx(0.25)
    assert gate(GatingConfig(score="entropy"), m).threshold == pytest.approx(0.4)


def test_missing_reference_quantiles_are_refused_clearly() -> None:
    """A bundle without quantiles for the chosen score asks for a fixed threshold."""
    message = "the bundle has no reference quantiles for the margin score; set a fixed threshold"
    with pytest.raises(ValueError, match=message):
        gate(GatingConfig(score="margin"))
    assert gate(GatingConfig(score="margin", threshold=0.3)).threshold == pytest.approx(0.3)


def test_per_class_threshold_applies_by_predicted_class() -> None:
    """A per-class threshold replaces the global one for rows predicted as that label only."""
    g = gate(GatingConfig(threshold=0.6, per_class={"digit-7": 0.9}, audit_rate=0.0))
    batch = g.decide(rows((7, 0.8, 0.1), (6, 0.8, 0.1), (7, 0.95, 0.01)))
    assert batch.thresholds.tolist() == pytest.approx([0.9, 0.6, 0.9])
    assert batch.verdicts.tolist() == [UNCERTAIN, CONFIDENT, CONFIDENT]
    assert g.class_thresholds["digit-7"] == pytest.approx(0.9)
    assert g.class_thresholds["digit-6"] == pytest.approx(0.6)


def test_per_class_with_an_unknown_label_is_refused() -> None:
    """A per-class threshold for a label the model does not have is refused by name."""
    with pytest.raises(ValueError, match=r"gating\.per_class names 'cat', which is not a label"):
        gate(GatingConfig(threshold=0.5, per_class={"cat": 0.9}))


def test_audit_rate_picks_confident_rows_at_the_configured_rate() -> None:
    """Of 10,000 confident rows about 1 % become audits (within 5 binomial sigmas); uncertain
    rows are never audits."""
    g = gate(GatingConfig(threshold=0.5, audit_rate=0.01), seed=42)
    confident = g.decide(rows(*[(1, 0.9, 0.05)] * 10_000))
    audits = int(np.count_nonzero(confident.verdicts == AUDIT))
    sigma = math.sqrt(10_000 * 0.01 * 0.99)
    assert abs(audits - 100) < 5 * sigma
    assert set(confident.verdicts.tolist()) == {CONFIDENT, AUDIT}
    uncertain = g.decide(rows(*[(1, 0.3, 0.2)] * 10_000))
    assert set(uncertain.verdicts.tolist()) == {UNCERTAIN}


def test_counters_add_up_to_rows_gated() -> None:
    """Confident, uncertain and audit counts are disjoint and add up to every row gated."""
    counters = GatingCounters()
    g = Gate(
        GatingConfig(threshold=0.5, audit_rate=0.5),
        manifest(),
        LABELS,
        np.random.default_rng(1),
        counters,
    )
    batch = g.decide(rows(*[(1, 0.9, 0.05)] * 50, *[(2, 0.3, 0.2)] * 20))
    audits = int(np.count_nonzero(batch.verdicts == AUDIT))
    assert counters.uncertain == 20 and counters.audit == audits
    assert counters.confident == 50 - audits and 0 < audits < 50
    assert counters.as_dict()["uncertain"] == 20


def test_refuses_probabilities_of_the_wrong_shape() -> None:
    """A batch whose width is not the model's class count is refused."""
    with pytest.raises(ValueError, match=r"probabilities must be \[n, 10\], not \[2, 3\]"):
        gate(GatingConfig(threshold=0.5)).decide(np.zeros((2, 3), np.float32))


def test_empty_batch_gives_empty_verdicts() -> None:
    """An empty batch is fine and counts nothing."""
    g = gate(GatingConfig(threshold=0.5))
    assert g.decide(np.zeros((0, 10), np.float32)).verdicts.tolist() == []
    assert sum(g.counters.as_dict().values()) == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold": 1.5}, "threshold must be between 0 and 1"),
        ({"threshold": 0.5, "reference_quantile": 0.1}, "threshold must not be set together"),
        ({"reference_quantile": 1.0}, "reference_quantile must be strictly between 0 and 1"),
        ({"per_class": {"digit-1": -0.1}}, "per_class threshold of 'digit-1' must be between"),
        ({"audit_rate": 2.0}, "audit_rate must be between 0 and 1"),
    ],
)
def test_config_refuses_out_of_bounds(kwargs: dict[str, Any], message: str) -> None:
    """Each bound is refused with one sentence naming the field."""
    with pytest.raises(ValueError, match=message):
        GatingConfig(**kwargs)


def test_config_decodes_from_toml_sections() -> None:
    """`[gating]` and `[gating.budget]` decode strictly, bounds checked, unknown keys refused."""
    text = (
        b'score = "margin"\nthreshold = 1\n'
        b'[per_class]\n"digit-3" = 0.5\n'
        b"[budget]\nsamples_per_hour = 10\n"
    )
    config = msgspec.toml.decode(text, type=GatingConfig)
    assert config.threshold == 1.0 and config.per_class == {"digit-3": 0.5}
    assert config.budget == UploadBudgetConfig(samples_per_hour=10)
    with pytest.raises(msgspec.ValidationError, match="audit_share must be"):
        msgspec.toml.decode(b"[budget]\naudit_share = 1.0\n", type=GatingConfig)
    with pytest.raises(msgspec.ValidationError, match="unknown field `bogus`"):
        msgspec.toml.decode(b"bogus = 1\n", type=GatingConfig)
