"""The outbox's SQLite file: schema, checked opening with recovery, and the statements.

One aiosqlite connection (its own thread) is the only writer. A file that is corrupt or
truncated is moved aside with its WAL and a fresh one is started; the caller raises an event.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from edged.atomic import fsync_directory

__all__ = ["ROW_OVERHEAD", "SCHEMA", "Store"]

# Bytes a row costs beyond its body (key, columns, index entries): what the quota counts.
ROW_OVERHEAD = 64

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value REAL NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    klass INTEGER NOT NULL,
    boot INTEGER NOT NULL,
    clock REAL NOT NULL,
    created REAL NOT NULL,
    size INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS records_by_class ON records (klass, seq);
CREATE INDEX IF NOT EXISTS records_by_age ON records (klass, clock);
"""
_SIDECARS = ("-wal", "-shm")


class Store:
    """Statements over one writing connection (transactions are the caller's) and one
    read-only connection for leases: WAL lets it read committed records without queueing
    behind the writer's transactions, and it can never see an uncommitted one."""

    def __init__(self, db: aiosqlite.Connection, reader: aiosqlite.Connection, path: Path) -> None:
        self.db = db
        self.reader = reader
        self.path = path
        self._synchronous_full: bool | None = None

    @classmethod
    async def open(cls, path: Path) -> tuple[Store, str | None]:
        """Open (creating if needed) and check the file. A file SQLite cannot use is moved
        aside and replaced; the second value then says why and where it went."""
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return await cls._open_checked(path), None
        except sqlite3.OperationalError:
            raise  # locked, unreadable, I/O: the file may be fine; never move it aside
        except sqlite3.DatabaseError as exc:
            moved = _move_aside(path)
            store = await cls._open_checked(path)
            reason = (str(exc).splitlines() or ["damaged"])[0][:200]
            return store, f"{reason}; the damaged file was moved to {moved.name}"

    @classmethod
    async def _open_checked(cls, path: Path) -> Store:
        db = await aiosqlite.connect(path, isolation_level=None)
        try:
            check = list(await (await db.execute("PRAGMA quick_check")).fetchall())
            if [tuple(row) for row in check] != [("ok",)]:
                raise sqlite3.DatabaseError(f"integrity check failed: {check[0][0]}")
            mode = await (await db.execute("PRAGMA journal_mode=WAL")).fetchone()
            if mode is None or mode[0] != "wal":
                raise sqlite3.DatabaseError("cannot switch the file to WAL mode")
            await db.execute("PRAGMA journal_size_limit=8388608")
            await db.executescript(SCHEMA)
            reader = await aiosqlite.connect(f"file:{path}?mode=ro", uri=True)
        except BaseException:
            await db.close()
            raise
        store = cls(db, reader, path)
        await store.set_synchronous(full=True)
        return store

    async def close(self) -> None:
        await self.reader.close()
        await self.db.close()

    async def set_synchronous(self, *, full: bool) -> None:
        """FULL: a commit is on disk when it returns. NORMAL (relaxed): WAL without fsync at
        commit; never corrupts, may lose the last commits on power loss."""
        if self._synchronous_full is not full:
            await self.db.execute(f"PRAGMA synchronous={'FULL' if full else 'NORMAL'}")
            self._synchronous_full = full

    async def begin(self) -> None:
        await self.db.execute("BEGIN IMMEDIATE")

    async def commit(self) -> None:
        await self.db.execute("COMMIT")

    async def rollback(self) -> None:
        if self.db.in_transaction:
            await self.db.execute("ROLLBACK")

    async def usage(self) -> dict[int, tuple[int, int]]:
        """Per class index: (records, quota bytes)."""
        rows = await self._all(
            "SELECT klass, COUNT(*), COALESCE(SUM(size), 0) + COUNT(*) * ? FROM records "
            "GROUP BY klass",
            (ROW_OVERHEAD,),
        )
        return {int(k): (int(n), int(b)) for k, n, b in rows}

    async def last_seq(self) -> int:
        rows = await self._all("SELECT seq FROM sqlite_sequence WHERE name = 'records'")
        return int(rows[0][0]) if rows else 0

    async def meta(self, key: str, default: float) -> float:
        rows = await self._all("SELECT value FROM meta WHERE key = ?", (key,))
        return float(rows[0][0]) if rows else default

    async def set_meta(self, key: str, value: float) -> None:
        await self.db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    async def max_clock(self) -> float:
        rows = await self._all("SELECT MAX(clock) FROM records")
        return float(rows[0][0]) if rows and rows[0][0] is not None else 0.0

    async def insert(self, rows: Iterable[tuple[int, int, int, float, float, int, bytes]]) -> None:
        """Rows of (seq, klass, boot, clock, created, size, body)."""
        await self.db.executemany(
            "INSERT INTO records (seq, klass, boot, clock, created, size, body) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows,
        )

    async def delete_oldest(self, klass: int, quota_bytes: int) -> tuple[int, int]:
        """Delete the oldest records of a class until at least `quota_bytes` are freed."""
        freed, count, cutoff = 0, 0, None
        async with self.db.execute(
            "SELECT seq, size FROM records WHERE klass = ? ORDER BY seq", (klass,)
        ) as cursor:
            async for seq, size in cursor:
                freed += int(size) + ROW_OVERHEAD
                count += 1
                cutoff = int(seq)
                if freed >= quota_bytes:
                    break
        if cutoff is not None:
            await self.db.execute(
                "DELETE FROM records WHERE klass = ? AND seq <= ?", (klass, cutoff)
            )
        return count, freed

    async def expire(self, klass: int, before_clock: float) -> tuple[int, int]:
        rows = await self._all(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) + COUNT(*) * ? FROM records "
            "WHERE klass = ? AND clock < ?",
            (ROW_OVERHEAD, klass, before_clock),
        )
        count, freed = int(rows[0][0]), int(rows[0][1])
        if count:
            await self.db.execute(
                "DELETE FROM records WHERE klass = ? AND clock < ?", (klass, before_clock)
            )
        return count, freed

    async def delete(self, seqs: Sequence[int]) -> dict[int, tuple[int, int]]:
        """Delete records by sequence; per class index: (records, quota bytes) removed."""
        removed: dict[int, tuple[int, int]] = {}
        for start in range(0, len(seqs), 500):
            chunk = list(seqs[start : start + 500])
            marks = ",".join("?" * len(chunk))
            rows = await self._all(
                f"SELECT klass, COUNT(*), COALESCE(SUM(size), 0) + COUNT(*) * ? FROM records "
                f"WHERE seq IN ({marks}) GROUP BY klass",
                (ROW_OVERHEAD, *chunk),
            )
            await self.db.execute(f"DELETE FROM records WHERE seq IN ({marks})", chunk)
            for klass, count, size in rows:
                before = removed.get(int(klass), (0, 0))
                removed[int(klass)] = (before[0] + int(count), before[1] + int(size))
        return removed

    async def after(self, klass: int, after_seq: int, limit: int) -> list[tuple[Any, ...]]:
        """Up to `limit` committed records of a class after a sequence: (seq, boot, created,
        body)."""
        async with self.reader.execute(
            "SELECT seq, boot, created, body FROM records WHERE klass = ? AND seq > ? "
            "ORDER BY seq LIMIT ?",
            (klass, after_seq, limit),
        ) as cursor:
            return [tuple(row) for row in await cursor.fetchall()]

    async def integrity(self) -> str:
        rows = await self._all("PRAGMA integrity_check")
        return str(rows[0][0])

    async def _all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        async with self.db.execute(sql, params) as cursor:
            return [tuple(row) for row in await cursor.fetchall()]


def _move_aside(path: Path) -> Path:
    """Rename the database and its WAL files to `<name>.corrupt-<unix time>`."""
    target = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    for suffix in ("", *_SIDECARS):
        source = Path(f"{path}{suffix}")
        if source.exists():
            os.replace(source, Path(f"{target}{suffix}"))
    fsync_directory(path.parent)
    return target
