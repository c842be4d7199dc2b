"""The upload budget for kept samples: hourly and daily buckets on a fake clock, class quotas,
the audit reserve, near-duplicate suppression and reloads."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from edged.sample_budget import (
    DAY,
    HOUR,
    GatingCounters,
    Suppressed,
    UploadBudget,
    UploadBudgetConfig,
    signature_of,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def frames(count: int, seed: int = 0) -> list[np.ndarray]:
    """Distinct random 64-value signatures."""
    rng = np.random.default_rng(seed)
    return [rng.uniform(0, 255, 64).astype(np.float32) for _ in range(count)]


def make(**config: Any) -> tuple[UploadBudget, Clock]:
    clock = Clock()
    return UploadBudget(UploadBudgetConfig(**config), clock), clock


def offer(
    budget: UploadBudget,
    signatures: list[np.ndarray],
    *,
    klass: int | None = None,
    nbytes: int = 100,
    audit: bool = False,
) -> list[Suppressed | None]:
    """Admit each signature, as class `klass` or each as its own class."""
    return [
        budget.admit(i if klass is None else klass, nbytes, s, audit=audit)
        for i, s in enumerate(signatures)
    ]


def test_hourly_budget_suppresses_then_refills() -> None:
    """With 4 samples an hour, the fifth is suppressed; a quarter hour later one more goes."""
    budget, clock = make(samples_per_hour=4)
    assert offer(budget, frames(5)) == [None] * 4 + [Suppressed.HOURLY_BUDGET]
    clock.now += HOUR / 4 + 1
    assert offer(budget, frames(2, seed=1)) == [None, Suppressed.HOURLY_BUDGET]


def test_daily_bytes_roll_over_after_a_day() -> None:
    """The day's bytes (less the audit share) run out, half come back in 12 h, all in 24 h."""
    budget, clock = make(bytes_per_day=10_000, audit_share=0.0, samples_per_hour=1000)
    assert offer(budget, frames(11), nbytes=1000) == [None] * 10 + [Suppressed.DAILY_BYTES]
    clock.now += DAY / 2 + 1
    assert offer(budget, frames(6, seed=1), nbytes=1000) == [None] * 5 + [Suppressed.DAILY_BYTES]
    clock.now += DAY
    assert offer(budget, frames(10, seed=2), nbytes=1000) == [None] * 10


def test_class_quota_holds_one_class_back_only() -> None:
    """One class past its hourly quota is suppressed while another class still goes."""
    budget, _ = make(class_per_hour=2)
    assert offer(budget, frames(3), klass=7) == [None, None, Suppressed.CLASS_QUOTA]
    assert offer(budget, frames(1, seed=1), klass=8) == [None]


def test_identical_and_noisy_frames_are_suppressed_as_duplicates() -> None:
    """A repeated frame and one with small noise are duplicates; a different frame is not."""
    budget, _ = make()
    base = frames(1)[0]
    noisy = base + np.random.default_rng(1).normal(0, 2, 64).astype(np.float32)
    other = frames(1, seed=5)[0]
    assert budget.admit(1, 100, base, audit=False) is None
    assert budget.admit(1, 100, base.copy(), audit=False) == Suppressed.DUPLICATE
    assert budget.admit(1, 100, noisy, audit=False) == Suppressed.DUPLICATE
    assert budget.admit(1, 100, base * 1.5, audit=False) == Suppressed.DUPLICATE  # brighter
    assert budget.admit(1, 100, other, audit=False) is None


def test_duplicates_are_judged_against_the_last_window_only() -> None:
    """A frame pushed out of the dedup window by newer ones is admitted again."""
    budget, _ = make(dedup_window=2)
    a, b, c = frames(3)
    assert offer(budget, [a, b, a, c, a]) == [None, None, Suppressed.DUPLICATE, None, None]


def test_all_zero_frames_are_duplicates_of_each_other() -> None:
    """A stuck all-black sensor is suppressed after its first frame."""
    budget, _ = make()
    zero = np.zeros(64, np.float32)
    assert offer(budget, [zero, zero.copy()]) == [None, Suppressed.DUPLICATE]


def test_duplicate_suppression_spends_nothing() -> None:
    """Suppressed duplicates do not use the hourly budget."""
    budget, _ = make(samples_per_hour=2)
    a, b = frames(2)
    assert offer(budget, [a, a, a, b]) == [None, Suppressed.DUPLICATE, Suppressed.DUPLICATE, None]


def test_audits_are_not_starved_by_an_uncertain_flood() -> None:
    """With the uncertain budget spent, audits still go on their own hourly count and share
    of the bytes, without class quota or duplicate checks."""
    budget, _ = make(samples_per_hour=3, audit_per_hour=2, bytes_per_day=10_000, audit_share=0.1)
    offer(budget, frames(10))
    same = frames(1)[0]
    assert offer(budget, [same] * 3, audit=True, klass=1) == [
        None,
        None,
        Suppressed.HOURLY_BUDGET,
    ]
    budget2, _ = make(audit_per_hour=100, bytes_per_day=10_000, audit_share=0.1)
    results = offer(budget2, frames(3), audit=True, nbytes=400)
    assert results == [None, None, Suppressed.DAILY_BYTES]  # 1,000 B reserved for audits


def test_reconfigure_keeps_what_was_spent() -> None:
    """A reload with a bigger hourly budget grants only the difference this hour; remembered
    signatures still suppress duplicates."""
    budget, _ = make(samples_per_hour=3)
    a, b, c, d, e = frames(5)
    assert offer(budget, [a, b, c, d]) == [None, None, None, Suppressed.HOURLY_BUDGET]
    budget.reconfigure(UploadBudgetConfig(samples_per_hour=5))
    assert offer(budget, [a, d, e, frames(1, seed=9)[0]]) == [
        Suppressed.DUPLICATE,
        None,
        None,
        Suppressed.HOURLY_BUDGET,
    ]


def test_reconfigure_keeps_class_quota_spending() -> None:
    """A class's quota spent before a reload stays spent after it."""
    budget, _ = make(class_per_hour=2)
    offer(budget, frames(2), klass=3)
    budget.reconfigure(UploadBudgetConfig(class_per_hour=3))
    assert offer(budget, frames(2, seed=1), klass=3) == [None, Suppressed.CLASS_QUOTA]


def test_every_outcome_is_counted() -> None:
    """Uploaded and each suppression reason land in the shared counters."""
    counters = GatingCounters()
    budget = UploadBudget(UploadBudgetConfig(samples_per_hour=2), Clock(), counters)
    a, b, c = frames(3)
    offer(budget, [a, a, b, c])
    assert counters.as_dict() == {
        "confident": 0,
        "uncertain": 0,
        "audit": 0,
        "uploaded": 2,
        "suppressed_duplicate": 1,
        "suppressed_hourly_budget": 1,
        "suppressed_daily_bytes": 0,
        "suppressed_class_quota": 0,
    }


def test_signature_of_an_image_is_an_8_by_8_grid_of_block_means() -> None:
    """A 16x16x3 image becomes 64 block means over 2x2 pixels, channels averaged."""
    image = np.zeros((16, 16, 3), np.uint8)
    image[:2, :2, :] = 30
    image[:2, :2, 0] = 90
    signature = signature_of(image, None)
    assert signature.shape == (64,) and signature.dtype == np.float32
    assert signature[0] == pytest.approx(50.0) and not signature[1:].any()


def test_signature_of_small_and_flat_inputs() -> None:
    """Inputs of at most 64 values are used as they are; longer vectors are block-averaged;
    an embedding wins over the raw input."""
    small = np.arange(64, dtype=np.uint8).reshape(8, 8, 1)
    assert signature_of(small, None).tolist() == list(range(64))
    flat = np.repeat(np.arange(64, dtype=np.float32), 3)
    assert signature_of(flat, None).tolist() == list(range(64))
    embedding = np.array([0.5, -1.0], np.float32)
    assert signature_of(small, embedding).tolist() == [0.5, -1.0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"samples_per_hour": -1}, "samples_per_hour must be a non-negative integer"),
        ({"bytes_per_day": -1}, "bytes_per_day must be a non-negative integer"),
        ({"audit_share": 1.0}, "audit_share must be at least 0 and less than 1"),
        ({"dedup_similarity": 0.0}, "dedup_similarity must be greater than 0"),
    ],
)
def test_config_refuses_out_of_bounds(kwargs: dict[str, Any], message: str) -> None:
    """Each bound is refused with one sentence naming the field."""
    with pytest.raises(ValueError, match=message):
        UploadBudgetConfig(**kwargs)


def test_spending_carries_over_a_restart_and_refills_for_the_time_between() -> None:
    """`spent()` through JSON into a new budget: the hour's allowance, the class quota (class
    indices stay integers) and the bytes stay spent; saved half an hour ago, half of the
    hourly allowance is back; malformed state counts as nothing spent."""
    import json

    budget, _ = make(samples_per_hour=4, class_per_hour=2, dedup_window=0)
    signs = frames(6, seed=9)
    assert [budget.admit(i % 2, 100, signs[i], audit=False) for i in range(4)] == [None] * 4
    saved = json.loads(json.dumps(budget.spent()))
    again, _ = make(samples_per_hour=4, class_per_hour=2, dedup_window=0)
    again.restore(saved, 0.0)
    assert again.admit(0, 100, signs[4], audit=False) == Suppressed.CLASS_QUOTA
    assert again.admit(2, 100, signs[4], audit=False) == Suppressed.HOURLY_BUDGET
    later, _ = make(samples_per_hour=4, class_per_hour=2, dedup_window=0)
    later.restore(saved, HOUR / 2)
    assert [later.admit(2 + i, 100, signs[4 + i], audit=False) for i in range(2)] == [None, None]
    assert later.admit(4, 100, frames(1, seed=10)[0], audit=False) == Suppressed.HOURLY_BUDGET
    broken, _ = make(samples_per_hour=4)
    broken.restore({"hourly": "lots", "classes": 7}, 0.0)
    assert broken.admit(0, 100, signs[5], audit=False) is None
