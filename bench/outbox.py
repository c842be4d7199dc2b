"""Outbox benchmark: durable enqueue rate against a raw batched synchronous=FULL SQLite loop.

Value: records/s that `PRODUCERS` concurrent asyncio tasks get through `Outbox.put("sample",
body)` (a durable class: each put returns only once its record is committed with
synchronous=FULL; concurrent puts share a commit) with 200-byte CBOR bodies, timed from the
first put to the last return, on a fresh SQLite file per round in the system's temporary
directory (its filesystem is recorded: on tmpfs an fsync would cost nothing). Baseline: plain
`sqlite3` on a fresh file, WAL, synchronous=FULL, a table with the outbox's columns and
indexes, `BEGIN IMMEDIATE; executemany(100 rows); COMMIT` in a loop. The variants (durable
puts, baseline, `put_many` of 100, relaxed telemetry puts) alternate within each round,
rotating which goes first; each figure is the median of the rounds.

`p99_enqueue_ms` is the 99th percentile of single durable puts under that load (all rounds
pooled). `fsyncs_per_1000` is `Outbox.commits` per 1,000 records (one WAL fsync per
synchronous=FULL commit); `fsyncs_counted_per_1000` counts the real fsync/fdatasync calls of
the same workload in a child process under `strace -c` (minus a run that only opens and
closes), checkpoints included. The kill -9 soak SIGKILLs `tests.support.outbox_writer` at
random moments (two files soaked at a time) and checks after each kill that the file passes
`PRAGMA integrity_check` and holds every record whose put had returned.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import cbor2

from bench.common import REPO, Result, conditions, median, percentile
from edged.outbox import Outbox, OutboxConfig
from edged.outbox_store import SCHEMA as OUTBOX_SCHEMA

__all__ = ["run"]

ROUNDS = 7
PRODUCERS = 256
PUTS_PER_PRODUCER = 40  # 10,240 durable puts per round
RAW_RECORDS = 20_000
RAW_BATCH = 100
MANY_RECORDS = 10_000
MANY_BATCH = 100
RELAXED_RECORDS = 20_000
RELAXED_YIELD_EVERY = 256  # a producer that yields to the loop now and then, as a daemon would
BODY = {"n": 0, "x": bytes(range(192))}  # 200 bytes of CBOR
KILL9_ROUNDS = 200
KILL9_PER_FILE = 25
KILL9_LANES = 2  # files soaked at the same time
KILL9_CONCURRENCY = 16
KILL9_MAX_DELAY_S = 0.25
KILL9_SEED = 7
FSYNC_RECORDS = PRODUCERS * PUTS_PER_PRODUCER
TARGETS = {
    "fsyncs_per_1000": "fsyncs_per_1000 <= 100",
    "kill9_lost": "kill9_lost == 0",
    "kill9_integrity_failures": "kill9_integrity_failures == 0",
}

# The raw baseline's table: the outbox's own schema, so the two cannot drift apart.
_RAW_SCHEMA = OUTBOX_SCHEMA
_INSERT = (
    "INSERT INTO records (seq, klass, boot, clock, created, size, body) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)


@dataclass
class _Rounds:
    durable: list[float] = field(default_factory=list)
    raw: list[float] = field(default_factory=list)
    many: list[float] = field(default_factory=list)
    relaxed: list[float] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    commits: int = 0
    durable_records: int = 0
    many_commits: int = 0
    many_records: int = 0


def run() -> Result:
    """Interleaved rounds, then the fsync count under strace, then the kill -9 soak."""
    with tempfile.TemporaryDirectory(prefix="edged-bench-outbox-") as tmp:
        workdir = Path(tmp)
        started = time.perf_counter()
        rounds = asyncio.run(_measure(workdir))
        rounds_s = time.perf_counter() - started
        started = time.perf_counter()
        counted = _counted_fsyncs(workdir)
        fsync_s = time.perf_counter() - started
        started = time.perf_counter()
        soak = _kill9_soak(workdir)
        soak_s = time.perf_counter() - started
    durable, raw = median(rounds.durable), median(rounds.raw)
    many, relaxed = median(rounds.many), median(rounds.relaxed)
    metrics: dict[str, Any] = {
        "p99_enqueue_ms": round(percentile(rounds.latencies_ms, 99), 3),
        "p50_enqueue_ms": round(percentile(rounds.latencies_ms, 50), 3),
        "fsyncs_per_1000": round(rounds.commits * 1000 / rounds.durable_records, 2),
        "records_per_commit": round(rounds.durable_records / rounds.commits, 1),
        **counted,
        "put_many_records_per_s": round(many, 1),
        "put_many_ratio": round(many / raw, 4),
        "put_many_fsyncs_per_1000": round(rounds.many_commits * 1000 / rounds.many_records, 2),
        "relaxed_records_per_s": round(relaxed, 1),
        "relaxed_ratio": round(relaxed / raw, 4),
        "ratio_min": round(min(d / r for d, r in zip(rounds.durable, rounds.raw, strict=True)), 4),
        "ratio_max": round(max(d / r for d, r in zip(rounds.durable, rounds.raw, strict=True)), 4),
        "rounds_records_per_s": [round(v, 1) for v in rounds.durable],
        "rounds_baseline_records_per_s": [round(v, 1) for v in rounds.raw],
        **soak,
        "rounds_s": round(rounds_s, 2),
        "fsync_count_s": round(fsync_s, 2),
        "kill9_s": round(soak_s, 2),
    }
    return Result(
        name="outbox",
        value=round(durable, 1),
        unit="records/s",
        baseline=round(raw, 1),
        baseline_is=(
            f"plain sqlite3, WAL, synchronous=FULL, BEGIN IMMEDIATE + executemany of "
            f"{RAW_BATCH} rows + COMMIT per batch, 200-byte bodies, a table with the outbox's "
            f"columns and indexes, fresh file per round, interleaved with the outbox rounds"
        ),
        target="ratio >= 0.30",
        metrics=metrics,
        targets=TARGETS,
        conditions=conditions(
            workload=(
                f"{PRODUCERS} asyncio tasks each awaiting {PUTS_PER_PRODUCER} durable "
                f"put('sample', body) calls in turn"
            ),
            body_bytes=len(cbor2.dumps(BODY)),
            rounds=ROUNDS,
            baseline_records_per_round=RAW_RECORDS,
            baseline_batch=RAW_BATCH,
            put_many=f"one task, put_many of {MANY_BATCH} records, {MANY_RECORDS} per round",
            relaxed=(
                f"one task, {RELAXED_RECORDS} put('telemetry', body) yielding every "
                f"{RELAXED_YIELD_EVERY}, then flush(); timed until flush returns"
            ),
            fsyncs_per_1000_from="Outbox.commits (one WAL fsync per synchronous=FULL commit)",
            fsyncs_counted_from=(
                f"strace -f -c -e trace=fsync,fdatasync of a child doing the same "
                f"{FSYNC_RECORDS}-record workload, minus a child that only opens and closes"
            ),
            kill9=(
                f"tests.support.outbox_writer DB {KILL9_CONCURRENCY}, SIGKILL after "
                f"uniform(0, {KILL9_MAX_DELAY_S}) s once ready, seed {KILL9_SEED}, "
                f"{KILL9_PER_FILE} kills per file, {KILL9_LANES} files at a time"
            ),
            filesystem=_filesystem(Path(tempfile.gettempdir())),
            sqlite=sqlite3.sqlite_version,
            aiosqlite=metadata.version("aiosqlite"),
            outbox_config="quota 1 GiB, min_free_bytes 0, otherwise defaults (max_group 4096)",
        ),
    )


# -- the interleaved rounds ------------------------------------------------------------------


async def _measure(workdir: Path) -> _Rounds:
    rounds = _Rounds()
    body = cbor2.dumps(BODY)

    async def durable(path: Path) -> None:
        rate, latencies, commits = await _durable_puts(path)
        rounds.durable.append(rate)
        rounds.latencies_ms.extend(latencies)
        rounds.commits += commits
        rounds.durable_records += PRODUCERS * PUTS_PER_PRODUCER

    async def raw(path: Path) -> None:
        rounds.raw.append(_raw_inserts(path, body, RAW_RECORDS))

    async def many(path: Path) -> None:
        rate, commits = await _put_many(path)
        rounds.many.append(rate)
        rounds.many_commits += commits
        rounds.many_records += MANY_RECORDS

    async def relaxed(path: Path) -> None:
        rounds.relaxed.append(await _relaxed_puts(path))

    variants: dict[str, Callable[[Path], Awaitable[None]]] = {
        "durable": durable,
        "raw": raw,
        "many": many,
        "relaxed": relaxed,
    }
    names = list(variants)
    await _durable_puts(workdir / "warmup.db", producers=32, per_producer=10)  # not counted
    _raw_inserts(workdir / "warmup-raw.db", body, 1000)
    for index in range(ROUNDS):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            path = workdir / f"{name}-{index}.db"
            await variants[name](path)
            _remove_db(path)
    return rounds


def _config(path: Path) -> OutboxConfig:
    return OutboxConfig(path, quota_bytes=1 << 30, min_free_bytes=0)


async def _durable_puts(
    path: Path, producers: int = PRODUCERS, per_producer: int = PUTS_PER_PRODUCER
) -> tuple[float, list[float], int]:
    """records/s of concurrent durable puts, each put's latency in ms, and the commits."""
    latencies: list[float] = []
    clock = time.perf_counter
    async with Outbox(_config(path)) as outbox:
        await outbox.put("sample", BODY)  # the file exists and the writer is running

        async def producer() -> None:
            for _ in range(per_producer):
                start = clock()
                await outbox.put("sample", BODY)
                latencies.append((clock() - start) * 1e3)

        commits = outbox.commits
        started = clock()
        await asyncio.gather(*(producer() for _ in range(producers)))
        elapsed = clock() - started
        commits = outbox.commits - commits
    return producers * per_producer / elapsed, latencies, commits


async def _put_many(path: Path) -> tuple[float, int]:
    async with Outbox(_config(path)) as outbox:
        await outbox.put("sample", BODY)
        commits = outbox.commits
        started = time.perf_counter()
        for _ in range(MANY_RECORDS // MANY_BATCH):
            await outbox.put_many("sample", [BODY] * MANY_BATCH)
        elapsed = time.perf_counter() - started
        return MANY_RECORDS / elapsed, outbox.commits - commits


async def _relaxed_puts(path: Path) -> float:
    async with Outbox(_config(path)) as outbox:
        await outbox.put("sample", BODY)
        started = time.perf_counter()
        for index in range(RELAXED_RECORDS):
            await outbox.put("telemetry", BODY)
            if index % RELAXED_YIELD_EVERY == RELAXED_YIELD_EVERY - 1:
                await asyncio.sleep(0)
        await outbox.flush()
        return RELAXED_RECORDS / (time.perf_counter() - started)


def _raw_inserts(path: Path, body: bytes, records: int) -> float:
    """The baseline: rows/s of batched synchronous=FULL inserts with sqlite3 directly."""
    conn = _raw_open(path)
    try:
        started = time.perf_counter()
        _raw_insert_loop(conn, body, records)
        elapsed = time.perf_counter() - started
    finally:
        conn.close()
    return records / elapsed


def _raw_open(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.executescript(_RAW_SCHEMA)
    return conn


def _raw_insert_loop(conn: sqlite3.Connection, body: bytes, records: int) -> None:
    seq = 0
    for _ in range(records // RAW_BATCH):
        now = time.time()
        rows = [(seq + i, 2, 1, now, now, len(body), body) for i in range(1, RAW_BATCH + 1)]
        seq += RAW_BATCH
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(_INSERT, rows)
        conn.execute("COMMIT")


def _remove_db(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", ".boot"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


# -- real fsyncs, counted under strace -------------------------------------------------------


def _counted_fsyncs(workdir: Path) -> dict[str, float | None]:
    """fsync + fdatasync calls per 1,000 records, outbox and baseline, from strace -c."""
    counts: dict[str, float | None] = {}
    for mode, key in (("durable", "fsyncs_counted_per_1000"), ("raw", "baseline_fsyncs_per_1000")):
        try:
            loaded = _strace_fsyncs(workdir, mode, FSYNC_RECORDS)
            empty = _strace_fsyncs(workdir, mode, 0)
        except (OSError, RuntimeError) as exc:
            print(f"bench outbox: fsyncs not counted ({exc})", file=sys.stderr)
            counts[key] = None
            continue
        counts[key] = round((loaded - empty) * 1000 / FSYNC_RECORDS, 2)
    return counts


def _strace_fsyncs(workdir: Path, mode: str, records: int) -> int:
    db = workdir / f"strace-{mode}-{records}.db"
    out = workdir / f"strace-{mode}-{records}.txt"
    command = ["strace", "-f", "-qq", "--seccomp-bpf", "-c", "-o", str(out)]
    command += ["-e", "trace=fsync,fdatasync", sys.executable, "-m", "bench.outbox"]
    command += ["fsync-child", mode, str(db), str(records)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"strace child failed ({done.returncode}): {done.stderr.strip()}")
    calls = 0
    for line in out.read_text().splitlines():
        fields = line.split()
        if fields and fields[-1] in ("fsync", "fdatasync"):
            calls += int(fields[3])
    _remove_db(db)
    return calls


def _fsync_child(mode: str, db: Path, records: int) -> None:
    """The workload strace watches: open, `records` records, close."""
    if mode == "raw":
        conn = _raw_open(db)
        _raw_insert_loop(conn, cbor2.dumps(BODY), records)
        conn.close()
        return

    async def durable() -> None:
        async with Outbox(_config(db)) as outbox:
            per_producer = records // PRODUCERS

            async def producer() -> None:
                for _ in range(per_producer):
                    await outbox.put("sample", BODY)

            await asyncio.gather(*(producer() for _ in range(PRODUCERS if records else 0)))

    asyncio.run(durable())


# -- kill -9 soak ----------------------------------------------------------------------------


def _kill9_soak(workdir: Path) -> dict[str, int]:
    """SIGKILL the writer child KILL9_ROUNDS times: KILL9_PER_FILE kills on each of several
    files (a file that keeps growing makes every reopen's quick_check slower), two files at a
    time; after each kill, count the acknowledged records missing and integrity failures."""
    files = [
        (workdir / f"kill9-{start}.db", min(KILL9_PER_FILE, KILL9_ROUNDS - start), start)
        for start in range(0, KILL9_ROUNDS, KILL9_PER_FILE)
    ]
    with ThreadPoolExecutor(KILL9_LANES) as pool:
        results = list(pool.map(lambda job: _kill9_file(*job), files))
    return {
        "kill9_rounds": KILL9_ROUNDS,
        "kill9_lost": sum(r[0] for r in results),
        "kill9_integrity_failures": sum(r[1] for r in results),
        "kill9_acknowledged": sum(r[2] for r in results),
    }


def _kill9_file(db: Path, kills: int, seed: int) -> tuple[int, int, int]:
    """(acknowledged records lost, integrity failures, acknowledged records) of `kills`
    SIGKILLs of writers on one file."""
    rng = random.Random(KILL9_SEED * 1_000_003 + seed)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    acknowledged: set[int] = set()
    missing: set[int] = set()
    integrity_failures = 0
    for _ in range(kills):
        acknowledged |= _kill_writer(db, rng.uniform(0.0, KILL9_MAX_DELAY_S), env)
        conn = sqlite3.connect(db)
        try:
            if conn.execute("PRAGMA integrity_check").fetchone() != ("ok",):
                integrity_failures += 1
            present = {row[0] for row in conn.execute("SELECT seq FROM records")}
        finally:
            conn.close()
        missing |= acknowledged - present
    _remove_db(db)
    return len(missing), integrity_failures, len(acknowledged)


def _kill_writer(db: Path, delay: float, env: dict[str, str]) -> set[int]:
    """Start the writer child, SIGKILL it `delay` s after it is ready; the sequences it
    reported as durable."""
    command = [sys.executable, "-m", "tests.support.outbox_writer", str(db)]
    with subprocess.Popen(
        [*command, str(KILL9_CONCURRENCY)], stdout=subprocess.PIPE, env=env, cwd=REPO
    ) as child:
        assert child.stdout is not None
        if child.stdout.readline() != b"ready\n":
            child.kill()
            raise RuntimeError("the outbox writer child did not start")
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        out, _ = child.communicate(timeout=30)
    return {int(line) for line in out.split()}


def _filesystem(path: Path) -> str:
    """The type of the filesystem holding `path`: its longest mount point in /proc/mounts."""
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "unknown"
    resolved = str(path.resolve()).rstrip("/") + "/"
    holding = [m for m in mounts if len(m) >= 3 and resolved.startswith(m[1].rstrip("/") + "/")]
    return max(holding, key=lambda m: len(m[1]))[2] if holding else "unknown"


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "fsync-child":
        _fsync_child(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit("usage: python -m bench.outbox fsync-child {durable,raw} DB RECORDS")
