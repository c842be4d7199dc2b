"""The outbox on real SQLite files: durability, order, quota, TTL, leases, recovery, and a
writer process killed with SIGKILL at random moments."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edged.outbox import Outbox, OutboxConfig, OutboxError, OutboxFull

REPO = Path(__file__).resolve().parents[3]


def config(tmp_path: Path, **overrides) -> OutboxConfig:
    return OutboxConfig(tmp_path / "outbox.db", min_free_bytes=0, **overrides)


_FSYNC_CHILD = """
import asyncio, os, sys
from pathlib import Path
from edged.outbox import Outbox, OutboxConfig

def mark(name):
    os.write(2, f"MARK {name}\\n".encode())

async def main():
    config = OutboxConfig(Path(sys.argv[1]), min_free_bytes=0)
    async with Outbox(config) as outbox:
        await outbox.flush()
        mark("durable-start")
        await outbox.put("event", {"alarm": 1})
        mark("durable-returned")
        for i in range(200):
            assert await outbox.put("telemetry", {"i": i}) is None  # relaxed: at once
        await outbox.flush()
        mark("relaxed-committed")
        await asyncio.sleep(2.5)  # no traffic at all
        mark("idle-end")
        os._exit(0)  # no close: closing would checkpoint (and fsync) anyway

asyncio.run(main())
"""


def _fsyncs_between_marks(log: str) -> dict[str, list[float]]:
    """Times of the WAL's fsyncs after each mark (strace -f -ttt -y), by the mark before them."""
    after: dict[str, list[float]] = {}
    current, marked_at = "", 0.0
    for line in log.splitlines():
        fields = line.split()
        stamps = [f for f in fields[:2] if "." in f and f.replace(".", "").isdigit()]
        stamp = float(stamps[0]) if stamps else None
        if stamp is None:
            continue
        if "MARK " in line:
            current, marked_at = line.split("MARK ", 1)[1].split("\\n", 1)[0], stamp
            after[current] = []
        elif "sync(" in line and "outbox.db-wal" in line and current:
            after[current].append(stamp - marked_at)
    return after


def test_durable_puts_are_fsynced_and_relaxed_ones_within_a_second(tmp_path) -> None:
    """Under strace, at the system calls: a durable put returns only after an fsync of the
    WAL; relaxed puts return at once and, although no traffic follows, the WAL is fsynced
    within relaxed_sync_s (1 s) of their commit (before, nothing synced them until the
    next checkpoint or durable commit, however long that took)."""
    import shutil

    if shutil.which("strace") is None:
        if os.environ.get("CI"):
            pytest.fail("strace is missing (CI must not skip the fsync test)")
        pytest.skip("strace is not installed: the WAL's fsyncs cannot be counted")
    trace = tmp_path / "strace.log"
    command = ["strace", "-f", "-qq", "-ttt", "-y", "-o", str(trace)]
    command += ["-e", "trace=fsync,fdatasync,write", sys.executable, "-c", _FSYNC_CHILD]
    done = subprocess.run(
        [*command, str(tmp_path / "outbox.db")],
        cwd=REPO,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    after = _fsyncs_between_marks(trace.read_text())
    assert set(after) == {"durable-start", "durable-returned", "relaxed-committed", "idle-end"}
    assert after["durable-start"], "the durable put returned before any fsync of the WAL"
    synced = after["relaxed-committed"]
    assert synced, "relaxed commits were not fsynced during 2.5 s without traffic"
    assert synced[0] <= 1.5, synced


async def test_a_second_writer_process_is_refused(tmp_path) -> None:
    """While one process has the outbox open, another (a second daemon, `edged replay` on
    the same state directory) is refused in one sentence naming the holder's pid, rather
    than writing the sequence numbers the first one writes; once the holder is killed (-9)
    the file opens again with every record the holder acknowledged."""
    cfg = config(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(cfg.path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        with pytest.raises(OutboxError, match=rf"open in another process \(pid {holder.pid}\)"):
            async with Outbox(cfg):
                pass
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    async with Outbox(cfg) as outbox:
        records = await outbox.lease(10, 1 << 20)
    assert [r.body for r in records] == [{"held": True}]


_HOLDER = """
import asyncio, sys
from pathlib import Path
from edged.outbox import Outbox, OutboxConfig

async def main():
    async with Outbox(OutboxConfig(Path(sys.argv[1]), min_free_bytes=0)) as outbox:
        await outbox.put("event", {"held": True})
        print("open", flush=True)
        await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_durable_put_survives_reopen_and_keys_never_repeat(tmp_path) -> None:
    """A returned durable put is on disk after reopening; sequences continue and the boot
    epoch moves on, so (boot, seq) never repeats."""
    async with Outbox(config(tmp_path)) as outbox:
        first_boot = outbox.boot
        seqs = [await outbox.put("event", {"n": i}) for i in range(3)]
    assert seqs == [1, 2, 3]
    async with Outbox(config(tmp_path)) as outbox:
        assert outbox.boot == first_boot + 1
        assert await outbox.put("sample", b"raw") == 4
        records = await outbox.lease(10, 1 << 20)
    assert [(r.kind, r.seq, r.body) for r in records] == [
        ("event", 1, {"n": 0}),
        ("event", 2, {"n": 1}),
        ("event", 3, {"n": 2}),
        ("sample", 4, b"raw"),
    ]
    assert {r.boot for r in records} == {first_boot, first_boot + 1}


async def test_concurrent_puts_share_commits(tmp_path) -> None:
    """500 concurrent durable puts complete in far fewer commits than records."""
    async with Outbox(config(tmp_path)) as outbox:
        seqs = await asyncio.gather(*(outbox.put("sample", {"i": i}) for i in range(500)))
        assert sorted(seqs) == list(range(1, 501))
        assert outbox.commits < 50


async def test_relaxed_puts_return_at_once_and_land(tmp_path) -> None:
    """Relaxed (telemetry) puts return None immediately and are committed by close."""
    async with Outbox(config(tmp_path)) as outbox:
        assert await outbox.put("telemetry", {"cpu": 0.5}) is None
        assert outbox.stats().by_class["telemetry"].enqueued == 1
    async with Outbox(config(tmp_path)) as outbox:
        (record,) = await outbox.lease(10, 1 << 20)
        assert record.kind == "telemetry" and record.body == {"cpu": 0.5}


async def test_lease_order_release_and_ack(tmp_path) -> None:
    """Leases come highest priority first, never twice; released records come back;
    acknowledged ones are gone for good."""
    async with Outbox(config(tmp_path)) as outbox:
        await outbox.put("sample", "s1")
        await outbox.put("event", "e1")
        await outbox.put("telemetry", "t1")
        await outbox.put("event", "e2")
        await outbox.flush()
        first = await outbox.lease(2, 1 << 20)
        assert [r.body for r in first] == ["e1", "e2"]
        second = await outbox.lease(10, 1 << 20)
        assert [r.body for r in second] == ["t1", "s1"]
        assert await outbox.lease(10, 1 << 20) == []
        outbox.release([second[1].seq])
        assert [r.body for r in await outbox.lease(10, 1 << 20)] == ["s1"]
        await outbox.ack([r.seq for r in first])
        outbox.release()
        assert [r.body for r in await outbox.lease(10, 1 << 20)] == ["t1", "s1"]
        assert outbox.stats().by_class["event"].acked == 2
        assert outbox.stats().depth == 2


async def test_lease_respects_byte_budget(tmp_path) -> None:
    """A lease stops before the record that would exceed its byte budget."""
    async with Outbox(config(tmp_path)) as outbox:
        await outbox.put_many("sample", [b"x" * 1000 for _ in range(5)])
        assert len(await outbox.lease(100, 2500)) == 2
        assert len(await outbox.lease(100, 10_000)) == 3


async def test_quota_drops_oldest_lowest_class_and_reports(tmp_path) -> None:
    """Filling a small quota with samples, then adding events: the oldest samples go,
    events stay, the drops are counted and reported as an event, and the file stays small."""
    cfg = config(
        tmp_path, quota_bytes=256 * 1024, max_record_bytes=16 * 1024, drop_report_interval_s=0
    )
    async with Outbox(cfg) as outbox:
        for i in range(100):
            await outbox.put_many("sample", [{"i": i, "pad": b"p" * 4000}] * 4)
        stats = outbox.stats()
        assert stats.stored_bytes <= cfg.quota_bytes
        assert stats.by_class["sample"].dropped_quota > 300
        for i in range(10):
            await outbox.put("event", {"alert": i})
        records = await outbox.lease(10_000, 1 << 30)
    events = [r.body for r in records if r.kind == "event"]
    assert [e for e in events if "alert" in e] == [{"alert": i} for i in range(10)]
    drops = [e for e in events if e.get("event") == "outbox_dropped"]
    assert drops and drops[-1]["by_class"]["sample"]["dropped_quota"] > 300
    samples = [r.body["i"] for r in records if r.kind == "sample"]
    assert samples == sorted(samples) and samples[-1] == 99  # newest kept, oldest gone
    assert (tmp_path / "outbox.db").stat().st_size < 4 * cfg.quota_bytes


async def test_free_space_shrinks_the_quota(tmp_path) -> None:
    """With the filesystem nearly full the outbox stops growing into the reserve: it rotates
    within what it holds (alerts before samples), refuses what cannot fit, and never
    empties itself."""
    free = [400_000]
    cfg = OutboxConfig(tmp_path / "outbox.db", min_free_bytes=100_000, max_record_bytes=16 * 1024)
    async with Outbox(cfg, free_bytes=lambda _: free[0]) as outbox:
        await outbox.put_many("sample", [b"s" * 10_000 for _ in range(9)])
        held = outbox.stats().stored_bytes
        assert outbox.stats().by_class["sample"].dropped_quota == 0
        free[0] = 50_000  # someone else filled the disk past our reserve
        await outbox.put("sample", b"s" * 10_000)
        stats = outbox.stats()
        assert stats.stored_bytes <= held and stats.by_class["sample"].dropped_quota == 1
        await outbox.put("event", {"alert": 1})  # an alert still gets in, a sample makes room
        assert outbox.stats().by_class["sample"].dropped_quota >= 2
    async with Outbox(cfg, free_bytes=lambda _: 0) as outbox:
        await outbox.put_many("event", [{"alert": i} for i in range(2, 5)])  # samples make room
        bodies = [r.body for r in await outbox.lease(100, 1 << 20)]
        assert [b["alert"] for b in bodies if isinstance(b, dict) and "alert" in b] == [1, 2, 3, 4]
        assert any(isinstance(b, bytes) for b in bodies)  # not emptied: samples remain


async def test_full_of_alerts_refuses_samples_not_alerts(tmp_path) -> None:
    """When only alerts are stored and there is no room, a sample is refused with OutboxFull
    and every alert is kept."""
    cfg = OutboxConfig(
        tmp_path / "outbox.db", min_free_bytes=0, quota_bytes=64 * 1024, max_record_bytes=16 * 1024
    )
    async with Outbox(cfg) as outbox:
        while outbox.stats().stored_bytes < 60 * 1024:
            await outbox.put("event", {"pad": "e" * 1000})
        alerts = outbox.stats().by_class["event"].stored
        with pytest.raises(OutboxFull, match="no room for a sample record"):
            await outbox.put("sample", b"x" * 8000)
        assert outbox.stats().by_class["event"].stored == alerts
        assert outbox.stats().by_class["sample"].refused == 1


async def test_ttl_counts_uptime_not_wall_clock(tmp_path) -> None:
    """Records expire after their TTL of outbox-clock time; the wall clock jumping a year
    forward or back expires nothing."""
    mono, wall = [1000.0], [1.8e9]
    cfg = config(tmp_path, expiry_interval_s=0)
    async with Outbox(cfg, monotonic=lambda: mono[0], wall=lambda: wall[0]) as outbox:
        await outbox.put("sample", "old")
        wall[0] -= 365 * 86_400
        await outbox.put("sample", "after wall jump back")
        wall[0] += 2 * 365 * 86_400
        await outbox.put("event", "after wall jump forward")
        assert outbox.stats().by_class["sample"].expired == 0
        mono[0] += 7 * 86_400 + 1  # past the sample TTL, within the event TTL
        await outbox.put("event", "later")
        stats = outbox.stats()
        assert stats.by_class["sample"].expired == 2 and stats.by_class["event"].expired == 0
        bodies = [r.body for r in await outbox.lease(10, 1 << 20)]
    assert bodies == ["after wall jump forward", "later"]


async def test_clock_resumes_across_restarts(tmp_path) -> None:
    """Uptime before a restart still counts toward a record's TTL after it."""
    mono = [50.0]
    cfg = config(tmp_path, expiry_interval_s=0)
    async with Outbox(cfg, monotonic=lambda: mono[0]) as outbox:
        await outbox.put("sample", "kept across restart")
        mono[0] += 6 * 86_400
        await outbox.put("event", "tick")
    mono[0] = 10.0  # the machine rebooted: the monotonic source starts again
    async with Outbox(cfg, monotonic=lambda: mono[0]) as outbox:
        mono[0] += 86_400 + 1
        await outbox.put("event", "tick")
        assert outbox.stats().by_class["sample"].expired == 1


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
async def test_damaged_file_is_moved_aside_not_crashed_on(tmp_path, damage) -> None:
    """A corrupt or truncated database is moved aside, a fresh one starts, an event says so,
    and new records are taken."""
    cfg = config(tmp_path)
    async with Outbox(cfg) as outbox:
        await outbox.put_many("sample", [b"z" * 3000 for _ in range(200)])
    db = cfg.path
    data = db.read_bytes()
    if damage == "garbage":
        db.write_bytes(data[:100] + os.urandom(len(data) - 100))
    else:
        db.write_bytes(data[: len(data) // 3])
    async with Outbox(cfg) as outbox:
        assert outbox.stats().recovered
        assert await outbox.put("event", "alive") is not None
        records = await outbox.lease(10, 1 << 20)
        assert await outbox.integrity() == "ok"
    assert records[0].body["event"] == "outbox_recovered"
    assert records[-1].body == "alive"
    assert list(tmp_path.glob("outbox.db.corrupt-*"))


async def test_bad_records_are_refused_with_one_sentence(tmp_path) -> None:
    """Unknown classes, unencodable bodies and oversize records are refused clearly."""
    async with Outbox(config(tmp_path, max_record_bytes=1000)) as outbox:
        with pytest.raises(OutboxError, match="unknown record class 'log'"):
            await outbox.put("log", {})
        with pytest.raises(OutboxError, match="cannot be sent"):
            await outbox.put("event", {"f": object()})
        with pytest.raises(OutboxError, match="exceeds max_record_bytes"):
            await outbox.put("sample", b"x" * 2000)
        assert await outbox.put("event", "still serving") == 1


def test_kill_9_loses_no_acknowledged_record(tmp_path) -> None:
    """A writer process killed with SIGKILL at random moments under load, 50 times: after
    each kill the file passes integrity_check and holds every record whose put returned."""
    rng = random.Random(7)
    db = tmp_path / "outbox.db"
    acknowledged: set[int] = set()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for _ in range(50):
        child = subprocess.Popen(
            [sys.executable, "-m", "tests.support.outbox_writer", str(db), "16"],
            stdout=subprocess.PIPE,
            env=env,
            cwd=REPO,
        )
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0.0, 0.25))
        child.send_signal(signal.SIGKILL)
        out, _ = child.communicate(timeout=30)
        acknowledged |= {int(line) for line in out.split()}
        with sqlite3.connect(db) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            present = {row[0] for row in conn.execute("SELECT seq FROM records")}
        conn.close()
        missing = acknowledged - present
        assert not missing, f"{len(missing)} acknowledged records lost, e.g. {sorted(missing)[:5]}"
    assert len(acknowledged) > 1000


def damage_under(path: Path) -> None:
    """Everything past the file's first page overwritten with garbage while it is open (its
    WAL checkpointed into it first, so the damage is what SQLite reads next)."""
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    data = bytearray(path.read_bytes())
    data[4096:] = os.urandom(len(data) - 4096)
    path.write_bytes(bytes(data))


async def test_damage_found_by_a_lease_is_recovered_not_raised(tmp_path) -> None:
    """Damage the uplink's lease finds first (its read connection) is handed to the writer:
    the lease returns nothing instead of raising (it killed the uplink and the daemon), the
    file is replaced with an event, and records put afterwards are leased from the new one."""
    cfg = config(tmp_path)
    async with Outbox(cfg) as outbox:
        await outbox.put_many("sample", [b"s" * 3000 for _ in range(300)])
        old_boot = outbox.boot
        damage_under(cfg.path)
        assert await outbox.lease(50, 1 << 20) == []
        await outbox.flush()
        assert outbox.stats().recovered and outbox.boot > old_boot
        seq = await outbox.put("event", {"after": "recovery"})
        leased = await outbox.lease(50, 1 << 20)
    assert [(r.seq, r.body) for r in leased if r.kind == "event" and "after" in r.body] == [
        (seq, {"after": "recovery"})
    ]
    assert {r.boot for r in leased} == {outbox.boot}


async def test_damage_found_mid_run_starts_a_new_boot_and_voids_old_acks(tmp_path) -> None:
    """When the file is damaged under a running outbox, the replacement gets a new boot
    epoch (no key is reused), and PUBACKs for records leased from the old file delete
    nothing in the new one."""
    cfg = config(tmp_path)
    async with Outbox(cfg) as outbox:
        await outbox.put_many("sample", [b"s" * 3000 for _ in range(300)])
        in_flight = await outbox.lease(20, 1 << 20)
        old_boot = outbox.boot
        damage_under(cfg.path)
        for attempt in range(5):  # the first commits find the damage and recover
            with contextlib.suppress(OutboxError):
                await outbox.put("event", {"try": attempt})
        assert outbox.stats().recovered and outbox.boot > old_boot
        fresh = [await outbox.put("event", {"new": i}) for i in range(25)]
        await outbox.ack([r.seq for r in in_flight])  # late PUBACKs for the old file
        left = await outbox.lease(1000, 1 << 24)
    kept = {r.seq for r in left}
    assert all(seq in kept for seq in fresh)
    assert {r.boot for r in left} == {outbox.boot}
