"""Labelled samples for fine-tuning (docs/finetune.md): the bounded label store (SQLite) and the
ring of recent results a label can name by `sample_id` or by its source's `ref`.

A label is keyed by its sample: a later label for the same sample replaces the earlier one. The
store keeps the raw input (so a new base can embed it again) and the embedding with the base
version that computed it. Bounded by count and bytes, the oldest go first. Like the sample
store it is a local copy: synchronous=NORMAL, and a damaged file is moved aside, not fatal.
"""

from __future__ import annotations

import sqlite3
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiosqlite
import numpy as np
import numpy.typing as npt

__all__ = ["Label", "LabelSource", "LabelStore", "Recent", "RecentResults", "embedding_origin"]

LabelSource = Literal["cloud", "local", "pseudo"]


def embedding_origin(version: str, block_trainable: bool) -> str:
    """The model version whose backbone computed an embedding that `version` produced: a
    personalised model's base ('1.2.0+local.3' -> '1.2.0') when fine-tunes change its head
    alone; its own where they may train the last block (the embedding may differ)."""
    return version if block_trainable else version.split("+local.", 1)[0]


SCHEMA = """
CREATE TABLE IF NOT EXISTS labels (
    key TEXT PRIMARY KEY,
    label INTEGER NOT NULL,
    source TEXT NOT NULL,
    created REAL NOT NULL,
    dtype TEXT NOT NULL,
    shape TEXT NOT NULL,
    input BLOB NOT NULL,
    embedding BLOB,
    embedded_on TEXT,
    bytes INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS labels_by_age ON labels (created);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class Label:
    key: str
    label: int
    source: LabelSource
    input: npt.NDArray[Any]
    embedding: npt.NDArray[np.float32] | None
    embedded_on: str | None  # the base version whose backbone computed the embedding
    created: float = 0.0


class LabelStore:
    """`async with LabelStore(path, max_labels, max_bytes) as store`."""

    def __init__(self, path: Path, max_labels: int = 5000, max_bytes: int = 64 << 20) -> None:
        self.path, self.max_labels, self.max_bytes = path, max_labels, max_bytes
        self._db: aiosqlite.Connection | None = None
        self.count = 0
        self.bytes = 0
        self.added = 0  # labels ever added (replacements too): "new since the last job"

    async def __aenter__(self) -> LabelStore:
        try:
            self._db = await self._open()
        except sqlite3.DatabaseError:
            if self._db is not None:
                await self._db.close()
            self.path.replace(self.path.with_name(self.path.name + ".damaged"))
            self._db = await self._open()
        await self._recount()
        async with self._db.execute("SELECT value FROM meta WHERE name = 'added'") as cursor:
            row = await cursor.fetchone()
        self.added = int(row[0]) if row else 0
        return self

    async def _open(self) -> aiosqlite.Connection:
        self._db = await aiosqlite.connect(self.path)
        await self._db.executescript("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;" + SCHEMA)
        return self._db

    async def __aexit__(self, *exc: object) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def add(self, label: Label) -> None:
        db = self._require()
        raw = np.ascontiguousarray(label.input)
        embedding = None if label.embedding is None else label.embedding.astype("<f4").tobytes()
        size = raw.nbytes + len(embedding or b"")
        await db.execute(
            "INSERT OR REPLACE INTO labels VALUES (?,?,?,?,?,?,?,?,?,?)",
            (
                label.key,
                label.label,
                label.source,
                label.created or time.time(),
                raw.dtype.str,
                ",".join(map(str, raw.shape)),
                raw.tobytes(),
                embedding,
                label.embedded_on,
                size,
            ),
        )
        self.added += 1
        await db.execute("INSERT OR REPLACE INTO meta VALUES ('added', ?)", (self.added,))
        await self._recount()
        while self.count > self.max_labels or self.bytes > self.max_bytes:
            excess = max(1, self.count - self.max_labels, self.count // 100)
            await db.execute(
                "DELETE FROM labels WHERE key IN (SELECT key FROM labels ORDER BY created LIMIT ?)",
                (excess,),
            )
            await self._recount()
        await db.commit()

    async def _recount(self) -> None:
        db = self._require()
        async with db.execute("SELECT count(*), coalesce(sum(bytes), 0) FROM labels") as cursor:
            row = await cursor.fetchone()
        self.count, self.bytes = (int(row[0]), int(row[1])) if row else (0, 0)

    async def all(self) -> list[Label]:
        """Every stored label, oldest first."""
        db = self._require()
        async with db.execute(
            "SELECT key, label, source, created, dtype, shape, input, embedding, embedded_on"
            " FROM labels ORDER BY created"
        ) as cursor:
            rows = await cursor.fetchall()
        return [
            Label(
                key=row[0],
                label=int(row[1]),
                source=row[2],
                created=float(row[3]),
                input=np.frombuffer(row[6], np.dtype(row[4])).reshape(
                    tuple(int(d) for d in row[5].split(",") if d)
                ),
                embedding=None if row[7] is None else np.frombuffer(row[7], "<f4"),
                embedded_on=row[8],
            )
            for row in rows
        ]

    async def counts_by_source(self) -> dict[str, int]:
        db = self._require()
        async with db.execute("SELECT source, count(*) FROM labels GROUP BY source") as cursor:
            return {str(s): int(n) for s, n in await cursor.fetchall()}

    def _require(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("the label store is not open")
        return self._db


@dataclass(frozen=True, slots=True)
class Recent:
    """One recent result, as a label needs it."""

    sample_id: str | None
    source: str
    ref: str
    input: npt.NDArray[Any]
    embedding: npt.NDArray[np.float32] | None
    embedded_on: str
    top1: int
    confidence: float


class RecentResults:
    """The last results by sample id and by (source, ref), bounded by count and bytes."""

    def __init__(self, max_results: int, max_bytes: int) -> None:
        self.max_results, self.max_bytes = max_results, max_bytes
        self._by_ref: OrderedDict[tuple[str, str], Recent] = OrderedDict()
        self._by_id: dict[str, tuple[str, str]] = {}
        self.bytes = 0

    def add(self, recent: Recent) -> None:
        if self.max_results == 0:
            return
        key = (recent.source, recent.ref)
        old = self._by_ref.pop(key, None)
        if old is not None:
            self._forget(old)
        self._by_ref[key] = recent
        if recent.sample_id is not None:
            self._by_id[recent.sample_id] = key
        self.bytes += _size(recent)
        while self._by_ref and (
            len(self._by_ref) > self.max_results or self.bytes > self.max_bytes
        ):
            self._forget(self._by_ref.popitem(last=False)[1])

    def _forget(self, recent: Recent) -> None:
        self.bytes -= _size(recent)
        if recent.sample_id is not None:
            self._by_id.pop(recent.sample_id, None)

    def by_id(self, sample_id: str) -> Recent | None:
        key = self._by_id.get(sample_id)
        return None if key is None else self._by_ref.get(key)

    def by_ref(self, ref: str, source: str | None = None) -> Recent | None:
        if source is not None:
            return self._by_ref.get((source, ref))
        for (_source, seen), recent in reversed(self._by_ref.items()):
            if seen == ref:
                return recent
        return None

    def __len__(self) -> int:
        return len(self._by_ref)


def _size(recent: Recent) -> int:
    return recent.input.nbytes + (0 if recent.embedding is None else recent.embedding.nbytes)
