"""Confidence scores of class probabilities, shared by the packer (reference quantiles) and the
device's gate, so both measure the same thing.

Every score is in [0, 1] and higher means more confident:

- `max_probability`: the top-1 probability;
- `margin`: top-1 minus top-2 probability;
- `entropy`: 1 - H(p) / log(classes), so a one-hot row scores 1 and a uniform row 0.

Inputs are float arrays [n, classes] whose rows are probability distributions; the scores are
computed for the whole batch at once and returned as float32 [n].
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt

__all__ = ["SCORES", "ScoreName", "entropy_score", "margin", "max_probability", "score"]

ScoreName = Literal["max_probability", "margin", "entropy"]
SCORES: tuple[ScoreName, ...] = get_args(ScoreName)

Probabilities = npt.NDArray[np.floating[Any]]
Scores = npt.NDArray[np.float32]
_TINY = np.float32(np.finfo(np.float32).tiny)


def max_probability(probabilities: Probabilities) -> Scores:
    """The top-1 probability of each row."""
    scores: Scores = np.asarray(probabilities, dtype=np.float32).max(axis=1)
    return scores


def margin(probabilities: Probabilities) -> Scores:
    """Top-1 minus top-2 probability of each row (the top-1 itself with a single class)."""
    p = np.asarray(probabilities, dtype=np.float32)
    if p.shape[1] < 2:
        return p[:, 0].copy()
    top2 = np.partition(p, p.shape[1] - 2, axis=1)[:, -2:]
    scores: Scores = top2[:, 1] - top2[:, 0]
    return scores


def entropy_score(probabilities: Probabilities) -> Scores:
    """1 - normalised entropy of each row, clipped to [0, 1] against rounding (0 log 0 = 0)."""
    p = np.asarray(probabilities, dtype=np.float32)
    classes = p.shape[1]
    if classes < 2:
        return np.ones(len(p), dtype=np.float32)
    # p * log(max(p, tiny)) is exactly 0 where p is 0: no 0 * -inf, no warning.
    entropy = -(p * np.log(np.maximum(p, _TINY))).sum(axis=1)
    scores: Scores = np.clip(1.0 - entropy * np.float32(1.0 / math.log(classes)), 0.0, 1.0)
    return scores


def score(name: ScoreName, probabilities: Probabilities) -> Scores:
    """The named score of each row."""
    if name == "max_probability":
        return max_probability(probabilities)
    if name == "margin":
        return margin(probabilities)
    if name == "entropy":
        return entropy_score(probabilities)
    raise ValueError(f"score must be one of {', '.join(SCORES)}, not {name!r}")
