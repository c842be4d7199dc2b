"""The hold-out split: by sha256 of the key, deterministic, at the share asked for."""

from __future__ import annotations

import hashlib

import pytest

from edged.finetune.split import holdout_mask, in_holdout


def test_membership_follows_the_documented_rule() -> None:
    """A key is held out iff int(sha256(key)) % 10,000 < share x 10,000."""
    for i in range(200):
        key = f"sample-{i}"
        bucket = int(hashlib.sha256(key.encode()).hexdigest(), 16) % 10_000
        assert in_holdout(key, 0.25) is (bucket < 2_500)


def test_same_key_same_side_and_share_is_respected() -> None:
    """The mask is the same on every call and holds about the share asked for."""
    keys = [f"k{i}" for i in range(4_000)]
    first, second = holdout_mask(keys, 0.25), holdout_mask(list(reversed(keys)), 0.25)
    assert (first == second[::-1]).all()
    assert 0.22 < first.mean() < 0.28


def test_a_larger_share_only_adds_keys() -> None:
    """Growing the share never moves a held-out key into training."""
    keys = [f"k{i}" for i in range(1_000)]
    small, large = holdout_mask(keys, 0.1), holdout_mask(keys, 0.3)
    assert not (small & ~large).any() and large.sum() > small.sum()


def test_share_outside_zero_one_is_refused() -> None:
    """A share that is not a fraction raises."""
    with pytest.raises(ValueError, match="between 0 and 1"):
        in_holdout("k", 1.5)
