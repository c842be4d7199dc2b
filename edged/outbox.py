"""The store-and-forward outbox: what the daemon hands over is never lost, never fills the
disk, and leaves only once the broker has acknowledged it.

- One SQLite file in WAL mode, one connection, one writer task. `put` for a durable class
  returns once its record is committed with synchronous=FULL; concurrent puts share one
  transaction (group commit), so speed comes from batching, not from weaker durability.
  Relaxed classes (high-rate telemetry) return at once and commit with synchronous=NORMAL:
  a power cut may lose the last commits, never corrupts the file. A FULL commit follows
  within `relaxed_sync_s` (1 s) of any relaxed one, by the next group or, when traffic
  stops, on its own, so what a power cut can take is the last second, not everything since
  the last checkpoint.
- Record classes carry a priority, a TTL on the outbox clock (device uptime, immune to wall
  clock jumps) and a share of a disk quota, which also shrinks to keep `min_free_bytes` free
  on the filesystem. Over quota, `plan_eviction` decides: oldest of the lowest class first,
  the highest class last; every drop is counted and reported as an event.
- Every record carries the idempotency key (device, boot epoch, sequence); the boot epoch
  lives beside the database so a replaced database never reuses keys.
- `lease` hands out records in priority order without handing the same one out twice;
  `ack` deletes them (after the broker's PUBACK); `release` returns unacknowledged ones after
  a disconnect. A crash in between means redelivery, which receivers de-duplicate by key.
- A corrupt or truncated file is moved aside and replaced, and an `outbox_recovered` event
  is queued: never a crash loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import logging
import math
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2

from edged.atomic import atomic_write
from edged.errors import EdgedError
from edged.outbox_policy import (
    DEFAULT_CLASSES,
    OutboxClock,
    RecordClass,
    check_classes,
    plan_eviction,
)
from edged.outbox_store import ROW_OVERHEAD, Store
from edged_formats import FormatError
from edged_formats.wire import Record, encode_record_parts

__all__ = [
    "LeasedRecord",
    "Outbox",
    "OutboxConfig",
    "OutboxError",
    "OutboxFull",
    "OutboxStats",
]

MIB = 1 << 20
log = logging.getLogger(__name__)


class OutboxError(EdgedError):
    """The outbox could not take or keep a record."""


class OutboxFull(OutboxError):
    """A record does not fit: the quota is held by records of higher priority."""


@dataclass(frozen=True, slots=True)
class OutboxConfig:
    """Where the outbox lives and the bounds it keeps."""

    path: Path
    classes: tuple[RecordClass, ...] = DEFAULT_CLASSES
    quota_bytes: int = 64 * MIB
    min_free_bytes: int = 64 * MIB
    max_record_bytes: int = 512 * 1024  # one record plus its envelope fits a wire message
    max_group: int = 4096
    relaxed_flush_s: float = 0.25
    relaxed_sync_s: float = 1.0  # relaxed commits are fsynced within this long
    expiry_interval_s: float = 1.0
    drop_report_interval_s: float = 60.0

    def __post_init__(self) -> None:
        check_classes(self.classes)
        if self.quota_bytes < 64 * 1024:
            raise ValueError("quota_bytes must be at least 64 KiB")
        if self.max_record_bytes > self.quota_bytes // 4:
            raise ValueError("max_record_bytes must be at most a quarter of quota_bytes")
        if not 0 < self.relaxed_flush_s <= self.relaxed_sync_s <= 60:
            raise ValueError("relaxed_flush_s and relaxed_sync_s: 0 < flush <= sync <= 60 s")


@dataclass(slots=True)
class ClassStats:
    """Counters of one record class since the outbox opened, and what it holds now."""

    stored: int = 0
    stored_bytes: int = 0
    enqueued: int = 0
    acked: int = 0
    dropped_quota: int = 0
    refused: int = 0
    expired: int = 0


@dataclass(frozen=True, slots=True)
class OutboxStats:
    boot: int
    by_class: dict[str, ClassStats] = field(default_factory=dict)
    recovered: str | None = None

    @property
    def depth(self) -> int:
        return sum(s.stored for s in self.by_class.values())

    @property
    def stored_bytes(self) -> int:
        return sum(s.stored_bytes for s in self.by_class.values())


@dataclass(frozen=True, slots=True)
class LeasedRecord:
    """A leased record in its wire encoding, with what the uplink needs to route and ack it."""

    kind: str
    seq: int
    encoded: bytes


@dataclass(slots=True)
class _Put:
    klass: RecordClass
    created: float
    body: bytes
    done: asyncio.Future[int] | None
    seq: int = 0
    internal: bool = False  # the outbox's own report: refusing it must not trigger another


@dataclass(slots=True)
class _Ack:
    seqs: Sequence[int]
    done: asyncio.Future[None]
    generation: int = 0  # the file the records were leased from


class Outbox:
    """Use as `async with Outbox(config) as outbox:`; all methods run on one event loop."""

    def __init__(
        self,
        config: OutboxConfig,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        free_bytes: Callable[[Path], int] | None = None,
    ) -> None:
        self.config = config
        self._monotonic = monotonic
        self._wall = wall
        self._free_bytes = free_bytes or (lambda path: shutil.disk_usage(path).free)
        self._classes = {c.name: c for c in config.classes}
        self._by_priority = sorted(config.classes, key=lambda c: c.priority)
        self._stats = {c.name: ClassStats() for c in config.classes}
        self._queue: asyncio.Queue[_Put | _Ack | None] = asyncio.Queue()
        self._leased: dict[int, str] = {}
        self._deleting: set[int] = set()  # acknowledged, delete not yet committed
        self._meta_pending: dict[str, float] = {}
        self._pending_counts: list[tuple[str, str, int]] = []
        self._closing = False
        self._cursor = {c.name: 0 for c in config.classes}
        self._store: Store | None = None
        self._writer: asyncio.Task[None] | None = None
        self._recovered: str | None = None
        self._last_expiry = -math.inf
        self._reported_drops = 0
        self._last_drop_report = -math.inf
        self.boot = 0
        self._generation = 0
        self._next_seq = 1
        self._durable_queued = 0
        self._wake = asyncio.Event()
        self._unsynced_since: float | None = None  # the first NORMAL commit since a FULL one
        self._damage_seen: sqlite3.DatabaseError | None = None  # by a lease, for the writer
        self._lock_fd: int | None = None
        self.commits = 0
        self._available = asyncio.Event()
        self._available.set()  # whatever the file holds at open

    # -- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Outbox:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        self._closing = False
        self._lock_file()
        try:
            await self._open_store()
        except BaseException:
            self._unlock_file()
            raise
        self._writer = asyncio.create_task(self._write_loop(), name="outbox-writer")

    def _lock_file(self) -> None:
        """One writer: an exclusive lock on `<file>.lock`, held until `close`, so a second
        process (another daemon, `edged replay` on the same state directory) is refused
        instead of writing sequence numbers the first one also writes."""
        path = self.config.path.with_name(self.config.path.name + ".lock")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise OutboxError(f"cannot open the outbox's lock {path} ({exc.strerror})") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutboxError(
                f"the outbox at {self.config.path} is open in another process (pid {holder}); "
                "it takes one writer"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _unlock_file(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the lock
            self._lock_fd = None

    async def _open_store(self) -> None:
        """Open (or, after damage, reopen) the file. Every opening is a new boot epoch, and
        acknowledgements from before it are void: a replaced file restarts its sequence,
        so neither keys nor deletes may carry over."""
        self.boot = self._next_boot_epoch()
        self._generation += 1
        self._deleting.clear()
        try:
            store, recovered = await Store.open(self.config.path)
        except sqlite3.Error as exc:  # locked, unreadable directory, I/O error: not damage
            raise OutboxError(f"cannot open the outbox at {self.config.path} ({exc})") from exc
        self._store = store
        self._unsynced_since = None
        self._next_seq = await store.last_seq() + 1
        resume = max(await store.meta("clock", 0.0), await store.max_clock())
        self._clock = OutboxClock(resume, self._monotonic)
        usage = await store.usage()
        for cls in self.config.classes:
            count, size = usage.get(cls.priority, (0, 0))
            self._stats[cls.name].stored, self._stats[cls.name].stored_bytes = count, size
        self._leased.clear()
        self._cursor = {c.name: 0 for c in self.config.classes}
        if recovered:
            self._recovered = recovered
            self._queue_event("outbox_recovered", {"reason": recovered})

    async def close(self) -> None:
        """Commit everything already handed over, then close the file."""
        if self._writer is not None:
            self._closing = True
            await self._queue.put(None)
            self._wake.set()
            await self._writer
            self._writer = None
            while not self._queue.empty():  # handed over during close: refused, never hung
                item = self._queue.get_nowait()
                if item is not None and item.done is not None and not item.done.done():
                    item.done.set_exception(OutboxError("the outbox closed before this record"))
        if self._store is not None:
            await self._store.close()
            self._store = None
        self._unlock_file()

    def _next_boot_epoch(self) -> int:
        """Boot epochs count up in a file beside the database. Without one (a new device or
        a lost file) they start at the wall-clock second, so keys never repeat."""
        path = self.config.path.with_name(self.config.path.name + ".boot")
        try:
            previous = int(path.read_text().strip())
        except (OSError, ValueError):
            previous = int(self._wall())
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, f"{previous + 1}\n".encode())
        except OSError as exc:
            raise OutboxError(f"cannot record the boot epoch in {path} ({exc.strerror})") from exc
        return previous + 1

    # -- producers ----------------------------------------------------------------------------

    async def put(self, kind: str, body: Any, *, created: float | None = None) -> int | None:
        """Hand a record over. Durable classes return its sequence once it is on disk;
        relaxed classes return None at once. OutboxFull if it cannot fit."""
        item = self._item(kind, body, created)
        if not item.klass.durable:
            self._queue.put_nowait(item)
            return None
        item.done = asyncio.get_running_loop().create_future()
        self._enqueue(item)
        return await item.done

    async def put_many(self, kind: str, bodies: Iterable[Any]) -> list[int]:
        """Several records of one durable class in one commit; their sequences."""
        loop = asyncio.get_running_loop()
        items = [self._item(kind, body, None) for body in bodies]
        for item in items:
            item.done = loop.create_future()
            self._enqueue(item)
        return [await item.done for item in items if item.done is not None]

    def _fail_group(self, group: Sequence[_Put | _Ack], error: OutboxError) -> None:
        """Fail every waiter; acknowledged records whose delete failed are handed out again
        (a duplicate the receiver removes, never a loss)."""
        for item in group:
            if isinstance(item, _Ack):
                self._deleting.difference_update(item.seqs)
                self.release(item.seqs)
            if item.done is not None and not item.done.done():
                item.done.set_exception(error)

    def _forget(self, seqs: Sequence[int]) -> None:
        for seq in seqs:
            self._leased.pop(seq, None)
            self._deleting.discard(seq)

    def _enqueue(self, item: _Put | _Ack) -> None:
        """Durable work wakes a writer that is gathering relaxed records."""
        if isinstance(item, _Ack) or item.klass.durable:
            self._durable_queued += 1
            self._wake.set()
        self._queue.put_nowait(item)

    def _item(self, kind: str, body: Any, created: float | None) -> _Put:
        if self._writer is None or self._closing:
            raise OutboxError("the outbox is not open")
        klass = self._classes.get(kind)
        if klass is None:
            raise OutboxError(f"unknown record class {kind!r} (known: {', '.join(self._classes)})")
        try:
            Record(kind, 0, 0, 0.0, body)  # what the wire will accept, checked now, not at send
            encoded = cbor2.dumps(body, canonical=True)  # spliced into messages as it is
        except (FormatError, cbor2.CBOREncodeError, TypeError, ValueError) as exc:
            raise OutboxError(f"a {kind} record body cannot be sent ({exc})") from exc
        if len(encoded) > self.config.max_record_bytes:
            raise OutboxError(
                f"a {kind} record of {len(encoded)} bytes exceeds max_record_bytes "
                f"({self.config.max_record_bytes})"
            )
        self._stats[kind].enqueued += 1
        return _Put(klass, self._wall() if created is None else created, encoded, None)

    def _queue_event(self, name: str, detail: dict[str, Any]) -> None:
        event_class = self._by_priority[0]
        body = cbor2.dumps({"event": name, **detail}, canonical=True)
        self._enqueue(_Put(event_class, self._wall(), body, None, internal=True))

    # -- the uplink's side --------------------------------------------------------------------

    async def lease(self, max_records: int, max_bytes: int) -> list[Record]:
        """Records not yet handed out, highest priority first, oldest first, up to the
        bounds; each is handed out once until `release`d or `ack`ed."""
        rows = await self._lease_rows(max_records, max_bytes)
        return [
            Record(kind, boot, seq, created, cbor2.loads(body))
            for kind, seq, boot, created, body in rows
        ]

    async def lease_encoded(
        self, max_records: int, max_bytes: int, *, skip: Collection[str] = ()
    ) -> list[LeasedRecord]:
        """`lease`, with each record already in its wire encoding (the uplink's path: bodies
        are never decoded); classes named in `skip` are left alone."""
        rows = await self._lease_rows(max_records, max_bytes, skip)
        return [
            LeasedRecord(kind, seq, encode_record_parts(kind, boot, seq, created, body))
            for kind, seq, boot, created, body in rows
        ]

    async def _lease_rows(
        self, max_records: int, max_bytes: int, skip: Collection[str] = ()
    ) -> list[tuple[str, int, int, float, bytes]]:
        """The rows to lease; none when the file cannot be read. Damage is handed to the
        writer, which owns the file and replaces it (leases never raise for it)."""
        store = self._require_store()
        try:
            return await self._read_leases(store, max_records, max_bytes, skip)
        except sqlite3.DatabaseError as exc:
            log.error("outbox: leasing failed: %s", exc)
            if not isinstance(exc, sqlite3.OperationalError) and self._damage_seen is None:
                self._damage_seen = exc
                self.ack_nowait([])  # wakes the writer, which recovers before its next group
            return []

    async def _read_leases(
        self, store: Store, max_records: int, max_bytes: int, skip: Collection[str]
    ) -> list[tuple[str, int, int, float, bytes]]:
        leased: list[tuple[str, int, int, float, bytes]] = []
        budget = max_bytes
        for cls in self._by_priority:
            if cls.name in skip:
                continue
            while len(leased) < max_records and budget > 0:
                want = max(1, min(256, max_records - len(leased)))
                rows = await store.after(cls.priority, self._cursor[cls.name], want)
                if not rows:
                    break
                for seq, boot, created, body in rows:
                    self._cursor[cls.name] = max(self._cursor[cls.name], int(seq))
                    if int(seq) in self._leased:
                        continue
                    if len(leased) >= max_records or (leased and len(body) > budget):
                        self._cursor[cls.name] = int(seq) - 1
                        budget = 0
                        break
                    self._leased[int(seq)] = cls.name
                    leased.append((cls.name, int(seq), int(boot), float(created), bytes(body)))
                    budget -= len(body)
        return leased

    def release(self, seqs: Iterable[int] | None = None) -> None:
        """Make leased records available again (all of them by default); records already
        acknowledged and awaiting their delete stay out."""
        candidates = list(self._leased) if seqs is None else list(seqs)
        chosen = [s for s in candidates if s in self._leased and s not in self._deleting]
        for seq in chosen:
            name = self._leased.pop(seq)
            self._cursor[name] = min(self._cursor[name], seq - 1)
        if chosen:
            self._available.set()

    async def wait_for_records(self) -> None:
        """Return when records may be available to lease: new ones committed or leased ones
        released since the last call."""
        await self._available.wait()
        self._available.clear()

    async def ack(self, seqs: Sequence[int]) -> None:
        """The broker has these: delete them, and return once the delete is committed."""
        await self.ack_nowait(seqs)

    def ack_nowait(self, seqs: Sequence[int]) -> asyncio.Future[None]:
        """Queue the delete and return at once; until it commits the records stay leased, so
        they are never handed out again."""
        current = [seq for seq in seqs if seq in self._leased]  # leased from this very file
        self._deleting.update(current)
        done = asyncio.get_running_loop().create_future()
        self._enqueue(_Ack(current, done, self._generation))
        return done

    async def flush(self) -> None:
        """Return once everything handed over so far, relaxed records included, is committed."""
        await self.ack([])

    def remember(self, key: str, value: float) -> None:
        """Keep a small number (e.g. the uplink's bytes sent today) in the outbox file; it is
        written with the next transaction, relaxed."""
        if key == "clock":
            raise OutboxError("'clock' is the outbox's own")
        self._meta_pending[key] = value

    async def recall(self, key: str, default: float) -> float:
        """A number kept with `remember`, or `default`."""
        return await self._require_store().meta(key, default)

    # -- reading state ------------------------------------------------------------------------

    def stats(self) -> OutboxStats:
        return OutboxStats(
            self.boot,
            {name: dataclasses.replace(s) for name, s in self._stats.items()},
            self._recovered,
        )

    async def integrity(self) -> str:
        return await self._require_store().integrity()

    def _require_store(self) -> Store:
        if self._store is None:
            raise OutboxError("the outbox is not open")
        return self._store

    # -- the one writer -----------------------------------------------------------------------

    async def _write_loop(self) -> None:
        closing = False
        while not closing:
            group, closing = await self._gather()
            if not group:
                continue
            try:
                await self._commit_group(group)
            except Exception as exc:  # the writer must outlive any one failure
                log.exception("outbox writer failed a group of %d", len(group))
                self._fail_group(group, OutboxError(f"the outbox could not commit ({exc})"))
                await asyncio.sleep(1.0)

    async def _gather(self) -> tuple[list[_Put | _Ack], bool]:
        """The next group: everything queued, up to max_group. A group of only relaxed
        records waits up to relaxed_flush_s for more, unless durable work arrives."""
        first = await self._next_queued()
        if first is None:
            return [], True
        group: list[_Put | _Ack] = [first]
        if self._durable_queued == 0:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.relaxed_flush_s):
                    await self._wake.wait()
        closing = False
        while len(group) < self.config.max_group and not self._queue.empty():
            item = self._queue.get_nowait()
            if item is None:
                closing = True
                break
            group.append(item)
        self._durable_queued -= sum(
            1 for item in group if isinstance(item, _Ack) or item.klass.durable
        )
        return group, closing

    async def _next_queued(self) -> _Put | _Ack | None:
        """The next queued item; while relaxed commits are not on disk yet, waiting no
        longer than their sync is due, and syncing them when it is."""
        while self._unsynced_since is not None:
            due = self._unsynced_since + self.config.relaxed_sync_s - self._monotonic()
            try:
                async with asyncio.timeout(max(0.0, due)):
                    return await self._queue.get()
            except TimeoutError:
                await self._sync()
        return await self._queue.get()

    def _sync_due(self) -> bool:
        since = self._unsynced_since
        return since is not None and self._monotonic() - since >= self.config.relaxed_sync_s

    async def _sync(self) -> None:
        """A FULL commit of the clock alone: its fsync of the WAL puts every earlier relaxed
        commit on disk too."""
        store = self._require_store()
        try:
            await store.set_synchronous(full=True)
            await store.begin()
            await store.set_meta("clock", self._clock.now())
            await store.commit()
        except sqlite3.DatabaseError as exc:
            log.warning("outbox: relaxed commits not synced (%s); trying again", exc)
            with contextlib.suppress(sqlite3.Error):
                await store.rollback()
            self._unsynced_since = self._monotonic()
            await self._recover_if_damaged(exc)
            return
        self._unsynced_since = None

    async def _commit_group(self, group: list[_Put | _Ack]) -> None:
        if self._damage_seen is not None:  # found by a lease: replace the file first
            damage, self._damage_seen = self._damage_seen, None
            await self._recover_if_damaged(damage)
        puts = [item for item in group if isinstance(item, _Put)]
        acks = [item for item in group if isinstance(item, _Ack)]
        durable = any(p.klass.durable for p in puts) or self._sync_due()
        try:
            accepted, refused = await self._transaction(puts, acks, durable)
        except sqlite3.DatabaseError as exc:
            self._fail_group(group, OutboxError(f"the outbox could not commit ({exc})"))
            await self._recover_if_damaged(exc)
            return
        if durable:
            self._unsynced_since = None
        elif self._unsynced_since is None:
            self._unsynced_since = self._monotonic()
        if accepted:
            self._available.set()
        for item in accepted:
            if item.done is not None and not item.done.done():
                item.done.set_result(item.seq)
        for item in refused:
            if item.done is not None and not item.done.done():
                item.done.set_exception(
                    OutboxFull(
                        f"the outbox is full: no room for a {item.klass.name} record within the "
                        f"{self._quota()}-byte quota"
                    )
                )
        for ack in acks:
            self._forget(ack.seqs)
            if not ack.done.done():
                ack.done.set_result(None)
        self._report_drops()

    async def _transaction(
        self, puts: list[_Put], acks: list[_Ack], durable: bool
    ) -> tuple[list[_Put], list[_Put]]:
        store = self._require_store()
        now = self._clock.now()
        self._pending_counts = []
        await store.set_synchronous(full=durable)
        await store.begin()
        try:
            changes = {name: [0, 0] for name in self._classes}  # records, bytes
            current = [
                seq for ack in acks if ack.generation == self._generation for seq in ack.seqs
            ]
            removed = await store.delete(current)
            self._apply_removed(removed, changes, "acked")
            if now - self._last_expiry >= self.config.expiry_interval_s:
                for cls in self.config.classes:
                    count, size = await store.expire(cls.priority, now - cls.ttl_s)
                    self._count(cls.name, changes, -count, -size, "expired", count)
            accepted, refused = await self._make_room(store, puts, changes)
            rows = []
            for item in accepted:
                item.seq, self._next_seq = self._next_seq, self._next_seq + 1
                rows.append(
                    (
                        item.seq,
                        item.klass.priority,
                        self.boot,
                        now,
                        item.created,
                        len(item.body),
                        item.body,
                    )
                )
                self._count(item.klass.name, changes, 1, len(item.body) + ROW_OVERHEAD, None, 0)
            await store.insert(rows)
            remembered, self._meta_pending = self._meta_pending, {}
            for key, value in remembered.items():
                await store.set_meta(key, value)
            await store.set_meta("clock", now)
            await store.commit()
            self.commits += 1
        except BaseException:
            await store.rollback()
            await self._reload_usage()
            raise
        if now - self._last_expiry >= self.config.expiry_interval_s:
            self._last_expiry = now
        for name, (count, size) in changes.items():
            self._stats[name].stored += count
            self._stats[name].stored_bytes += size
        for name, counter, amount in self._pending_counts:
            stats = self._stats[name]
            setattr(stats, counter, getattr(stats, counter) + amount)
        return accepted, refused

    async def _make_room(
        self, store: Store, puts: list[_Put], changes: dict[str, list[int]]
    ) -> tuple[list[_Put], list[_Put]]:
        incoming: dict[str, int] = {}
        for item in puts:
            incoming[item.klass.name] = incoming.get(item.klass.name, 0) + len(item.body)
            incoming[item.klass.name] += ROW_OVERHEAD
        stored = {n: s.stored_bytes + changes[n][1] for n, s in self._stats.items()}
        plan = plan_eviction(self.config.classes, stored, incoming, self._quota())
        for name, size in plan.evict.items():
            count, freed = await store.delete_oldest(self._classes[name].priority, size)
            self._count(name, changes, -count, -freed, "dropped_quota", count)
        refused: list[_Put] = []
        for name, excess in plan.refuse.items():
            remaining = excess
            for item in [p for p in puts if p.klass.name == name]:  # oldest first
                if remaining <= 0:
                    break
                refused.append(item)
                remaining -= len(item.body) + ROW_OVERHEAD
                if not item.internal:
                    self._pending_counts.append((name, "refused", 1))
        refused_ids = {id(item) for item in refused}
        return [p for p in puts if id(p) not in refused_ids], refused

    def _quota(self) -> int:
        """The configured quota, but never growing into the `min_free_bytes` reserve: below
        it the outbox stops growing and rotates within what it holds (freed pages are
        reused), rather than dropping everything. A new byte costs about two on disk until
        a checkpoint (the WAL, then the database)."""
        stored = sum(s.stored_bytes for s in self._stats.values())
        free = self._free_bytes(self.config.path.parent)
        room = max(0, free - self.config.min_free_bytes) // 2
        return min(self.config.quota_bytes, stored + room)

    def _apply_removed(
        self, removed: dict[int, tuple[int, int]], changes: dict[str, list[int]], counter: str
    ) -> None:
        by_priority = {c.priority: c.name for c in self.config.classes}
        for klass, (count, size) in removed.items():
            if klass in by_priority:
                self._count(by_priority[klass], changes, -count, -size, counter, count)

    def _count(
        self,
        name: str,
        changes: dict[str, list[int]],
        records: int,
        size: int,
        counter: str | None,
        amount: int,
    ) -> None:
        changes[name][0] += records
        changes[name][1] += size
        if counter:
            self._pending_counts.append((name, counter, amount))  # applied once committed

    async def _reload_usage(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            usage = await self._require_store().usage()
            for cls in self.config.classes:
                count, size = usage.get(cls.priority, (0, 0))
                self._stats[cls.name].stored, self._stats[cls.name].stored_bytes = count, size

    async def _recover_if_damaged(self, exc: sqlite3.DatabaseError) -> None:
        """A damaged file (not a full disk or a busy lock) is replaced, once per failure."""
        if isinstance(exc, sqlite3.OperationalError):
            return
        with contextlib.suppress(sqlite3.Error):
            await self._require_store().close()
        await self._open_store()

    def _report_drops(self) -> None:
        """Queue one `outbox_dropped` event per interval while records are being dropped."""
        dropped = sum(s.dropped_quota + s.refused for s in self._stats.values())
        now = self._clock.now()
        interval = self.config.drop_report_interval_s
        if dropped > self._reported_drops and now - self._last_drop_report >= interval:
            self._queue_event(
                "outbox_dropped",
                {
                    "by_class": {
                        name: {"dropped_quota": s.dropped_quota, "refused": s.refused}
                        for name, s in self._stats.items()
                    }
                },
            )
            self._reported_drops, self._last_drop_report = dropped, now
