"""The label store (real SQLite files) and the ring of recent results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edged.labels import Label, LabelStore, Recent, RecentResults


def _label(key: str, label: int = 1, *, size: int = 16, embedded: bool = True) -> Label:
    x = np.full((size,), label, np.uint8)
    embedding = np.arange(4, dtype=np.float32) + label if embedded else None
    return Label(key, label, "local", x, embedding, "1.0.0" if embedded else None)


async def test_labels_round_trip_and_a_later_label_replaces_an_earlier(tmp_path: Path) -> None:
    async with LabelStore(tmp_path / "labels.db") as store:
        await store.add(_label("a", 1))
        await store.add(_label("b", 2, embedded=False))
        await store.add(_label("a", 3))
        labels = {lb.key: lb for lb in await store.all()}
        assert store.count == 2 and store.added == 3
    assert labels["a"].label == 3 and labels["a"].source == "local"
    assert np.array_equal(labels["a"].input, np.full((16,), 3, np.uint8))
    assert np.array_equal(labels["a"].embedding, np.arange(4, dtype=np.float32) + 3)
    assert labels["a"].embedded_on == "1.0.0"
    assert labels["b"].embedding is None and labels["b"].embedded_on is None
    async with LabelStore(tmp_path / "labels.db") as again:  # survives a restart
        assert again.count == 2 and again.added == 3
        assert await again.counts_by_source() == {"local": 2}


async def test_the_store_is_bounded_by_count_and_bytes_oldest_first(tmp_path: Path) -> None:
    async with LabelStore(tmp_path / "count.db", max_labels=10) as store:
        for i in range(25):
            await store.add(_label(f"k{i}", i % 10))
        keys = [lb.key for lb in await store.all()]
    assert len(keys) <= 10 and keys[-1] == "k24" and "k0" not in keys
    per_label = 1000 + 16  # input bytes + embedding bytes
    async with LabelStore(tmp_path / "bytes.db", max_bytes=5 * per_label) as store:
        for i in range(12):
            await store.add(_label(f"k{i}", size=1000))
        assert store.bytes <= 5 * per_label
        assert [lb.key for lb in await store.all()][-1] == "k11"


async def test_a_damaged_file_is_moved_aside_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "labels.db"
    path.write_bytes(b"this is not sqlite" * 100)
    async with LabelStore(path) as store:
        await store.add(_label("a"))
        assert store.count == 1
    assert (tmp_path / "labels.db.damaged").read_bytes().startswith(b"this is not sqlite")


def _recent(ref: str, sample_id: str | None = None, source: str = "cam", size: int = 100) -> Recent:
    return Recent(sample_id, source, ref, np.zeros(size, np.uint8), None, "1.0.0", 0, 0.5)


def test_recent_results_find_by_id_and_ref_and_stay_bounded() -> None:
    ring = RecentResults(max_results=3, max_bytes=1 << 20)
    ring.add(_recent("r1", "s1"))
    ring.add(_recent("r2"))
    ring.add(_recent("r2", source="mic"))
    assert ring.by_id("s1") is not None and ring.by_id("s1").ref == "r1"
    assert ring.by_ref("r2", "cam") is not None and ring.by_ref("r2", "cam").source == "cam"
    assert ring.by_ref("r2").source == "mic"  # without a source: the most recent
    ring.add(_recent("r4"))
    assert len(ring) == 3 and ring.by_id("s1") is None and ring.by_ref("r1") is None
    by_bytes = RecentResults(max_results=100, max_bytes=250)
    for i in range(5):
        by_bytes.add(_recent(f"r{i}"))
    assert len(by_bytes) == 2 and by_bytes.bytes <= 250
    assert RecentResults(0, 1 << 20).by_ref("r") is None


@pytest.mark.parametrize("replaced", [True, False])
def test_recent_replacing_a_ref_keeps_the_byte_count_true(replaced: bool) -> None:
    ring = RecentResults(max_results=10, max_bytes=1 << 20)
    ring.add(_recent("r", "s1"))
    ring.add(_recent("r" if replaced else "q", "s2"))
    assert ring.bytes == (100 if replaced else 200)
    assert (ring.by_id("s1") is None) is replaced
