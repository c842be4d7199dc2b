"""Which kept samples may be queued for upload, pure: token buckets on an injected monotonic
clock, per-class quotas and near-duplicate suppression. It answers admit or suppress; it never
reads a file, sleeps or sends.

Uncertain samples draw on `samples_per_hour`, `class_per_hour` (per predicted label) and
`1 - audit_share` of `bytes_per_day`, and are suppressed when a signature of the last
`dedup_window` admitted ones is at least `dedup_similarity` cosine-similar. Audit samples (the
unbiased random share of confident ones) have their own budget, `audit_per_hour` and
`audit_share` of the bytes, so an uncertain flood never starves them; they skip the class quota
and the duplicate check, which would bias them. Every bucket starts full and refills
continuously (an hour's or a day's allowance over that hour or day, on the monotonic clock, not
aligned to UTC midnight). `spent()` and `restore()` carry the spending over a restart (the
caller keeps it on disk), so a daemon restarting in a loop does not get a fresh allowance each
time. docs/gating.md has the defaults.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

__all__ = ["GatingCounters", "Suppressed", "UploadBudget", "UploadBudgetConfig", "signature_of"]

HOUR = 3600.0
DAY = 86_400.0
MIB = 1 << 20
SIGNATURE_SIZE = 64
_GRID = 8  # 8 x 8 = SIGNATURE_SIZE spatial blocks for images


class UploadBudgetConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Limits on what gets queued for upload (TOML section `[gating.budget]`)."""

    samples_per_hour: int = 120
    bytes_per_day: int = 50 * MIB
    class_per_hour: int = 30
    audit_per_hour: int = 12
    audit_share: float = 0.1
    dedup_window: int = 64
    dedup_similarity: float = 0.995

    def __post_init__(self) -> None:
        for name in (
            "samples_per_hour",
            "bytes_per_day",
            "class_per_hour",
            "audit_per_hour",
            "dedup_window",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be a non-negative integer")
        if not 0.0 <= self.audit_share < 1.0:
            raise ValueError("audit_share must be at least 0 and less than 1")
        if not 0.0 < self.dedup_similarity <= 1.0:
            raise ValueError("dedup_similarity must be greater than 0 and at most 1")


class Suppressed(StrEnum):
    """Why a kept sample was not queued."""

    DUPLICATE = "duplicate"
    HOURLY_BUDGET = "hourly_budget"
    DAILY_BYTES = "daily_bytes"
    CLASS_QUOTA = "class_quota"


@dataclass(slots=True)
class GatingCounters:
    """Every gating outcome since start. `confident + uncertain + audit` is the rows gated
    (audit rows are confident rows picked for audit); `uploaded` and the `suppressed_*` split
    the uncertain and audit rows offered to the budget."""

    confident: int = 0
    uncertain: int = 0
    audit: int = 0
    uploaded: int = 0
    suppressed_duplicate: int = 0
    suppressed_hourly_budget: int = 0
    suppressed_daily_bytes: int = 0
    suppressed_class_quota: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def suppressed(self, reason: Suppressed) -> None:
        name = f"suppressed_{reason.value}"
        setattr(self, name, getattr(self, name) + 1)


class _Bucket:
    """`capacity` tokens, refilled at `capacity / period` per second."""

    __slots__ = ("_at", "capacity", "rate", "tokens")

    def __init__(self, capacity: float, period: float, now: float, spent: float = 0.0) -> None:
        self.capacity = capacity
        self.rate = capacity / period
        self.tokens = max(capacity - spent, 0.0)
        self._at = now

    def has(self, amount: float, now: float) -> bool:
        self.tokens = min(self.capacity, self.tokens + (now - self._at) * self.rate)
        self._at = now
        return self.tokens >= amount

    def spent(self, now: float) -> float:
        self.has(0.0, now)
        return self.capacity - self.tokens

    def refill(self, seconds: float) -> None:
        self.tokens = min(self.capacity, self.tokens + seconds * self.rate)


class _Recent:
    """Unit signatures of the last `size` admitted samples, in a ring."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._rows: npt.NDArray[np.float32] | None = None
        self._zero = np.zeros(size, dtype=bool)
        self._filled = 0
        self._next = 0

    def ordered(self) -> list[tuple[npt.NDArray[np.float32], bool]]:
        """Oldest first."""
        if self._rows is None:
            return []
        idx = [(self._next - self._filled + i) % self.size for i in range(self._filled)]
        return [(self._rows[i], bool(self._zero[i])) for i in idx]

    def similar(self, unit: npt.NDArray[np.float32], zero: bool, threshold: float) -> bool:
        rows = self._rows
        if rows is None or self._filled == 0 or rows.shape[1] != unit.shape[0]:
            return False
        if zero:  # all-zero frames have no direction: duplicates of each other only
            return bool(self._zero[: self._filled].any())
        return bool((rows[: self._filled] @ unit).max() >= threshold)

    def add(self, unit: npt.NDArray[np.float32], zero: bool) -> None:
        if self.size == 0:
            return
        if self._rows is None or self._rows.shape[1] != unit.shape[0]:
            self._rows = np.zeros((self.size, unit.shape[0]), dtype=np.float32)
            self._zero[:] = False
            self._filled = self._next = 0
        self._rows[self._next] = unit
        self._zero[self._next] = zero
        self._next = (self._next + 1) % self.size
        self._filled = min(self._filled + 1, self.size)


class UploadBudget:
    """Call `admit` for each uncertain or audit sample: None means queue it (and it has been
    charged), otherwise the reason it is suppressed. Outlives model swaps; `reconfigure` on
    reload keeps what has been spent."""

    def __init__(
        self,
        config: UploadBudgetConfig,
        clock: Callable[[], float],
        counters: GatingCounters | None = None,
    ) -> None:
        self._clock = clock
        self.counters = counters if counters is not None else GatingCounters()
        self._recent = _Recent(config.dedup_window)
        self._classes: dict[int | str, _Bucket] = {}
        self._apply(config, {})

    def _apply(self, config: UploadBudgetConfig, spent: dict[str, Any]) -> None:
        now = self._clock()
        audit_bytes = config.bytes_per_day * config.audit_share
        self.config = config
        self._hourly = _Bucket(config.samples_per_hour, HOUR, now, spent.get("hourly", 0.0))
        self._bytes = _Bucket(config.bytes_per_day - audit_bytes, DAY, now, spent.get("bytes", 0.0))
        self._audit_hourly = _Bucket(config.audit_per_hour, HOUR, now, spent.get("audit", 0.0))
        self._audit_bytes = _Bucket(audit_bytes, DAY, now, spent.get("audit_bytes", 0.0))
        self._classes = {  # (class, spent) pairs
            klass: _Bucket(config.class_per_hour, HOUR, now, used)
            for klass, used in spent.get("classes", [])
        }

    def spent(self) -> dict[str, Any]:
        """What each allowance has used now (plain numbers, for a JSON file)."""
        now = self._clock()
        return {
            "hourly": self._hourly.spent(now),
            "bytes": self._bytes.spent(now),
            "audit": self._audit_hourly.spent(now),
            "audit_bytes": self._audit_bytes.spent(now),
            # pairs, not a map: JSON would turn class indices into strings
            "classes": [[klass, b.spent(now)] for klass, b in self._classes.items()],
        }

    def restore(self, spent: dict[str, Any], elapsed_s: float) -> None:
        """Take over `spent()` as saved `elapsed_s` ago (each allowance has refilled for that
        long since); anything malformed counts as nothing spent."""
        elapsed = max(0.0, float(elapsed_s)) if math.isfinite(elapsed_s) else 0.0
        names = ("hourly", "bytes", "audit", "audit_bytes")
        try:
            used: dict[str, Any] = {name: float(spent.get(name, 0.0)) for name in names}
            used["classes"] = [
                (klass, float(value))
                for klass, value in spent.get("classes", [])
                if isinstance(klass, int | str) and not isinstance(klass, bool)
            ]
        except (TypeError, ValueError, AttributeError):
            return
        self._apply(self.config, used)
        for bucket in (self._hourly, self._bytes, self._audit_hourly, self._audit_bytes):
            bucket.refill(elapsed)
        for bucket in self._classes.values():
            bucket.refill(elapsed)

    def reconfigure(self, config: UploadBudgetConfig) -> None:
        """New limits, same spending: what was used in the current hour and day still counts,
        and the remembered signatures stay (the newest, if the window shrinks)."""
        spent = self.spent()
        kept = self._recent.ordered()[-config.dedup_window :] if config.dedup_window else []
        self._apply(config, spent)
        self._recent = _Recent(config.dedup_window)
        for unit, zero in kept:
            self._recent.add(unit, zero)

    def admit(
        self, klass: int | str, nbytes: int, signature: npt.NDArray[Any], *, audit: bool
    ) -> Suppressed | None:
        """Admit (and charge) one sample of predicted class `klass` (index or label: use one
        kind throughout), or say why not."""
        reason = self._audit(nbytes) if audit else self._uncertain(klass, nbytes, signature)
        if reason is None:
            self.counters.uploaded += 1
        else:
            self.counters.suppressed(reason)
        return reason

    def _audit(self, nbytes: int) -> Suppressed | None:
        now = self._clock()
        if not self._audit_hourly.has(1, now):
            return Suppressed.HOURLY_BUDGET
        if not self._audit_bytes.has(nbytes, now):
            return Suppressed.DAILY_BYTES
        self._audit_hourly.tokens -= 1
        self._audit_bytes.tokens -= nbytes
        return None

    def _uncertain(
        self, klass: int | str, nbytes: int, signature: npt.NDArray[Any]
    ) -> Suppressed | None:
        vector = np.asarray(signature, dtype=np.float32).ravel()
        norm = float(np.linalg.norm(vector))
        zero = norm == 0.0
        unit = vector if zero else vector / np.float32(norm)
        if self._recent.similar(unit, zero, self.config.dedup_similarity):
            return Suppressed.DUPLICATE
        now = self._clock()
        quota = self._classes.get(klass)
        if quota is None:
            quota = self._classes[klass] = _Bucket(self.config.class_per_hour, HOUR, now)
        if not quota.has(1, now):
            return Suppressed.CLASS_QUOTA
        if not self._hourly.has(1, now):
            return Suppressed.HOURLY_BUDGET
        if not self._bytes.has(nbytes, now):
            return Suppressed.DAILY_BYTES
        quota.tokens -= 1
        self._hourly.tokens -= 1
        self._bytes.tokens -= nbytes
        if np.isfinite(norm):  # a NaN frame is never remembered as a duplicate source
            self._recent.add(unit, zero)
        return None


def signature_of(
    raw_sample: npt.NDArray[Any], embedding: npt.NDArray[Any] | None = None
) -> npt.NDArray[np.float32]:
    """What near-duplicates are judged by: the embedding when the model has one, else the raw
    sample (no batch axis) averaged down to at most 64 values: an 8 x 8 grid of block means
    over the first two axes of an image (channels averaged), block means of a sequence."""
    if embedding is not None:
        return np.asarray(embedding, dtype=np.float32).ravel()
    x = np.asarray(raw_sample)
    if x.ndim >= 3 or (x.ndim == 2 and min(x.shape) >= _GRID):  # H, W, channels...
        # Rows first, straight from the raw dtype: one pass over the image, no float copy.
        rows = _block_means(x.reshape(x.shape[0], x.shape[1], -1), 0, _GRID).mean(axis=2)
        return _block_means(rows, 1, _GRID).ravel()
    return _block_means(x.ravel(), 0, SIGNATURE_SIZE)


def _block_means(x: npt.NDArray[Any], axis: int, parts: int) -> npt.NDArray[np.float32]:
    n = x.shape[axis]
    if n <= parts:
        return x.astype(np.float32, copy=False)
    edges = (np.arange(parts) * n) // parts
    sizes = np.diff(np.append(edges, n)).astype(np.float32)
    shape = [1] * x.ndim
    shape[axis] = parts
    sums = np.add.reduceat(x, edges, axis=axis, dtype=np.float32)
    return (sums / sizes.reshape(shape)).astype(np.float32, copy=False)
