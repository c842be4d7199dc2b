"""The validation gate: a fine-tuned candidate replaces the current model only if it is
measurably better on held-out labels and has not forgotten the base's task.

Pure: figures in, a verdict and its one-sentence reason out. The worker measures the figures
on the exported int8 model through LiteRT; forgetting is measured against the base (not the
current model), so successive jobs cannot add up their losses.

Beyond docs/finetune.md's two tests the gain must also not be chance: on a hold-out of ~75
labels a 0.02 gain is under two samples, and a head trained on shuffled labels passed the two
tests in 5 of 30 trials at 300 labels (13 of 30 at 100). So the hold-out samples the candidate
fixes (the current model got them wrong) must outnumber those it breaks by more than a fair
coin would: an exact one-sided sign test, p <= `max_chance` (0 of 30 shuffled passed, 30 of
30 honest at 300 labels; 20 of 30 honest at 100 labels, where the hold-out is ~25).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "GateFigures",
    "GatePolicy",
    "Verdict",
    "chance",
    "check_holdout_size",
    "decide",
]

# Accuracies are ratios of counts; compare with a margin below one count in a billion so
# 0.63 >= 0.61 + 0.02 holds as it does on paper.
_EPSILON = 1e-9


@dataclass(frozen=True, slots=True)
class GatePolicy:
    """The job's thresholds (docs/finetune.md, job.json)."""

    min_holdout: int = 20
    min_gain: float = 0.02
    max_replay_loss: float = 0.02
    max_chance: float = 0.05

    def __post_init__(self) -> None:
        if self.min_holdout < 1:
            raise ValueError("min_holdout must be at least 1")
        if not 0.0 <= self.min_gain <= 1.0:
            raise ValueError("min_gain must be between 0 and 1")
        if not 0.0 <= self.max_replay_loss <= 1.0:
            raise ValueError("max_replay_loss must be between 0 and 1")
        if not 0.0 < self.max_chance <= 1.0:
            raise ValueError("max_chance must be in (0, 1]")


@dataclass(frozen=True, slots=True)
class GateFigures:
    """Top-1 accuracies: the current and the candidate model on the hold-out labels, the base
    and the candidate on the replay set; and the hold-out samples the candidate fixed (right
    where the current model was wrong) and broke (the converse)."""

    holdout_current: float
    holdout_candidate: float
    replay_base: float
    replay_candidate: float
    fixed: int = 0
    broken: int = 0


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether the candidate may install, and why, in one sentence."""

    accepted: bool
    reason: str


def check_holdout_size(policy: GatePolicy, holdout: int) -> Verdict | None:
    """A rejection when too few labels fall in the hold-out to judge anything, else None."""
    if holdout < policy.min_holdout:
        return Verdict(
            False,
            f"only {holdout} labels fall in the hold-out, fewer than the "
            f"{policy.min_holdout} needed to judge a candidate",
        )
    return None


def decide(policy: GatePolicy, figures: GateFigures) -> Verdict:
    """Accept only a candidate that beats the current model on the hold-out by `min_gain` and
    stays within `max_replay_loss` of the base on the replay set."""
    f = figures
    if f.holdout_candidate + _EPSILON < f.holdout_current + policy.min_gain:
        return Verdict(
            False,
            f"hold-out accuracy {f.holdout_candidate:.3f} does not beat the current model's "
            f"{f.holdout_current:.3f} by {policy.min_gain:g}",
        )
    p = chance(f.fixed, f.broken)
    if p > policy.max_chance:
        return Verdict(
            False,
            f"hold-out gain could be chance: the candidate fixes {f.fixed} samples and breaks "
            f"{f.broken} (sign test p = {p:.3f} > {policy.max_chance:g})",
        )
    if f.replay_candidate + _EPSILON < f.replay_base - policy.max_replay_loss:
        return Verdict(
            False,
            f"replay accuracy {f.replay_candidate:.3f} falls more than "
            f"{policy.max_replay_loss:g} below the base's {f.replay_base:.3f}",
        )
    return Verdict(
        True,
        f"hold-out accuracy {f.holdout_candidate:.3f} beats the current model's "
        f"{f.holdout_current:.3f} by at least {policy.min_gain:g} and replay accuracy "
        f"{f.replay_candidate:.3f} stays within {policy.max_replay_loss:g} of the base's "
        f"{f.replay_base:.3f}",
    )


def chance(fixed: int, broken: int) -> float:
    """Probability that a candidate no better than the current model fixes at least `fixed`
    of the `fixed + broken` samples the two disagree on (exact one-sided sign test)."""
    if fixed < 0 or broken < 0:
        raise ValueError("sample counts must not be negative")
    n = fixed + broken
    return sum(math.comb(n, k) for k in range(fixed, n + 1)) / 2**n
