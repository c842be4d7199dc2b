"""The hold-out split: which labels the gate judges a candidate on.

A label is held out when sha256 of its sample key, read as a big-endian integer, modulo 10,000
is below `share` x 10,000. The same sample is always on the same side, across jobs, bases and
devices, so a label never trains one candidate and then judges the next.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

__all__ = ["BUCKETS", "holdout_mask", "in_holdout"]

BUCKETS = 10_000


def in_holdout(key: str, share: float) -> bool:
    """Whether the label of sample `key` belongs to the hold-out at this share (0..1)."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"hold-out share {share} is not between 0 and 1")
    bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest(), "big") % BUCKETS
    return bucket < share * BUCKETS


def holdout_mask(keys: Iterable[str], share: float) -> npt.NDArray[np.bool_]:
    """`in_holdout` for each key, as a boolean array in the keys' order."""
    return np.array([in_holdout(key, share) for key in keys], dtype=bool)
