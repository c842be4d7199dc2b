"""The local sample store: uncertain and audit samples the gate kept (raw input, output and
embedding), by sample id, so labels that arrive later (from the cloud or the application) can
find them for fine-tuning. Bounded by count and bytes: the oldest go first.

The outbox carries the upload copy durably; this copy is for local use, so it commits with
synchronous=NORMAL (a power cut may lose the last moments, never corrupt the file).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite
import numpy as np
import numpy.typing as npt

__all__ = ["KeptSample", "SampleStore"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    model TEXT NOT NULL,
    verdict TEXT NOT NULL,
    top1 INTEGER NOT NULL,
    dtype TEXT NOT NULL,
    shape TEXT NOT NULL,
    input BLOB NOT NULL,
    probabilities BLOB NOT NULL,
    embedding BLOB,
    bytes INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS samples_by_age ON samples (created);
"""


@dataclass(frozen=True, slots=True)
class KeptSample:
    id: str
    created: float
    model: str
    verdict: str
    top1: int
    input: npt.NDArray[Any]
    probabilities: npt.NDArray[np.float32]
    embedding: npt.NDArray[np.float32] | None


class SampleStore:
    """`async with SampleStore(path, max_samples, max_bytes) as store`."""

    def __init__(self, path: Path, max_samples: int = 10_000, max_bytes: int = 256 << 20) -> None:
        self.path, self.max_samples, self.max_bytes = path, max_samples, max_bytes
        self._db: aiosqlite.Connection | None = None
        self.count = 0
        self.bytes = 0

    async def __aenter__(self) -> SampleStore:
        try:
            self._db = await aiosqlite.connect(self.path)
            await self._db.executescript(
                "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;" + SCHEMA
            )
        except sqlite3.DatabaseError:
            # a damaged local copy is not worth a crash loop: the uploads are in the outbox
            if self._db is not None:
                await self._db.close()
            self.path.replace(self.path.with_name(self.path.name + ".damaged"))
            self._db = await aiosqlite.connect(self.path)
            await self._db.executescript("PRAGMA journal_mode=WAL;" + SCHEMA)
        async with self._db.execute("SELECT count(*), coalesce(sum(bytes), 0) FROM samples") as c:
            row = await c.fetchone()
        self.count, self.bytes = (int(row[0]), int(row[1])) if row else (0, 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def add(self, sample: KeptSample) -> None:
        db = self._require()
        raw = np.ascontiguousarray(sample.input)
        probabilities = sample.probabilities.astype(np.float32).tobytes()
        embedding = None if sample.embedding is None else sample.embedding.astype("<f4").tobytes()
        size = raw.nbytes + len(probabilities) + len(embedding or b"")
        await db.execute(
            "INSERT OR REPLACE INTO samples VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                sample.id,
                sample.created,
                sample.model,
                sample.verdict,
                sample.top1,
                raw.dtype.str,
                ",".join(map(str, raw.shape)),
                raw.tobytes(),
                probabilities,
                embedding,
                size,
            ),
        )
        self.count += 1
        self.bytes += size
        if self.count > self.max_samples or self.bytes > self.max_bytes:
            await self._evict()
        await db.commit()

    async def _evict(self) -> None:
        db = self._require()
        while self.count > self.max_samples or self.bytes > self.max_bytes:
            excess = max(1, self.count - self.max_samples, self.count // 100)
            await db.execute(
                "DELETE FROM samples WHERE id IN (SELECT id FROM samples ORDER BY created LIMIT ?)",
                (excess,),
            )
            async with db.execute("SELECT count(*), coalesce(sum(bytes), 0) FROM samples") as c:
                row = await c.fetchone()
            self.count, self.bytes = (int(row[0]), int(row[1])) if row else (0, 0)

    async def get(self, sample_id: str) -> KeptSample | None:
        db = self._require()
        async with db.execute("SELECT * FROM samples WHERE id = ?", (sample_id,)) as cursor:
            row = await cursor.fetchone()
        if row is None:
            return None
        shape = tuple(int(d) for d in row[6].split(",") if d)
        return KeptSample(
            id=row[0],
            created=row[1],
            model=row[2],
            verdict=row[3],
            top1=row[4],
            input=np.frombuffer(row[7], np.dtype(row[5])).reshape(shape),
            probabilities=np.frombuffer(row[8], np.float32),
            embedding=None if row[9] is None else np.frombuffer(row[9], "<f4"),
        )

    def _require(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("the sample store is not open")
        return self._db
