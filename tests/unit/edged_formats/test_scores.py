"""The shared confidence scores: hand-computed values, higher always more confident."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edged_formats.scores import entropy_score, margin, max_probability, score

ROWS = np.array(
    [[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [0.5, 0.3, 0.2, 0.0]], dtype=np.float32
)


def test_max_probability_is_the_top1() -> None:
    """The top-1 probability of each row."""
    assert max_probability(ROWS).tolist() == pytest.approx([1.0, 0.25, 0.5])


def test_margin_is_top1_minus_top2() -> None:
    """One-hot has margin 1, uniform 0, [.5, .3, .2, 0] 0.2."""
    assert margin(ROWS).tolist() == pytest.approx([1.0, 0.0, 0.2], abs=1e-6)


def test_entropy_score_is_one_minus_normalised_entropy() -> None:
    """One-hot scores 1, uniform 0, and the mixed row 1 - H / log 4 (0 log 0 taken as 0)."""
    h = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2))
    expected = [1.0, 0.0, 1 - h / math.log(4)]
    assert entropy_score(ROWS).tolist() == pytest.approx(expected, abs=1e-6)


def test_scores_are_float32_and_dispatch_by_name() -> None:
    """`score(name, p)` gives the named score as float32; unknown names are refused."""
    for name, function in [("max_probability", max_probability), ("margin", margin)]:
        result = score(name, ROWS)  # type: ignore[arg-type]
        assert result.dtype == np.float32 and result.tolist() == function(ROWS).tolist()
    with pytest.raises(ValueError, match="score must be one of"):
        score("confidence", ROWS)  # type: ignore[arg-type]


def test_single_class_outputs_are_fully_confident() -> None:
    """With one class there is nothing to be unsure between: margin and entropy score 1."""
    one = np.ones((2, 1), np.float32)
    assert margin(one).tolist() == [1.0, 1.0] and entropy_score(one).tolist() == [1.0, 1.0]
