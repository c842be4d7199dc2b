"""The daemon's systemd launcher on real files and processes: a request nobody picks up is
withdrawn with one sentence, the unit's result is read once its lock is free, a unit that ends
without a result is reported; and `[finetune] launcher` takes "process" or "systemd" only."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from edged.config import ConfigError, FinetuneConfig, parse_config
from edged.finetune.launchers import await_unit, hand_over, not_started
from edged.finetune.request import REQUEST_FILE, Request


def _dirs(tmp_path: Path) -> tuple[Path, Path]:
    finetune, job_dir = tmp_path / "finetune", tmp_path / "finetune" / "jobs" / "1"
    job_dir.mkdir(parents=True)
    return finetune, job_dir


SYSTEMD = FinetuneConfig(launcher="systemd", systemd_start_s=0.3, timeout_s=30)
# for tests whose stand-in unit is a real process: its start may take seconds on a busy machine
CLAIMED = FinetuneConfig(launcher="systemd", systemd_start_s=60, timeout_s=30)


async def test_a_request_nobody_picks_up_is_withdrawn_with_one_sentence(tmp_path: Path) -> None:
    """No path unit: after systemd_start_s the job fails with the sentence that names the
    unit, and the request is gone (no unit starts it later)."""
    finetune, job_dir = _dirs(tmp_path)
    report = await hand_over(finetune, job_dir, SYSTEMD)
    assert report == {
        "verdict": "failed",
        "reason": "the edged-finetune.path unit did not start the worker within 0.3 s; "
        "is it enabled?",
    }
    assert report["reason"] == not_started(0.3)
    assert not (finetune / REQUEST_FILE).exists()


async def test_the_unit_entry_result_is_what_the_daemon_reports(tmp_path: Path) -> None:
    """The real entry run as the path unit would: the daemon sees the claim, waits for the
    lock and reports the worker's own failed result."""
    pytest.importorskip("psutil", reason="the finetune extra (psutil) is not installed")
    finetune, job_dir = _dirs(tmp_path)
    (job_dir / "job.json").write_text('{"format": 1}')
    waiting = asyncio.create_task(hand_over(finetune, job_dir, CLAIMED))
    while not (finetune / REQUEST_FILE).exists():
        await asyncio.sleep(0.01)
    entry = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edged.finetune.service", str(finetune / REQUEST_FILE)
    )
    report = await asyncio.wait_for(waiting, 60)
    assert await entry.wait() == 2
    assert report["verdict"] == "failed"
    assert "job.json lacks the required field" in report["reason"]
    assert "worker_wall_s" in report


UNIT_DIES = """
import os, sys
from pathlib import Path
from edged.finetune.request import REQUEST_FILE, RUNNING_FILE, hold_lock
finetune = Path(sys.argv[1])
hold_lock(finetune)
os.rename(finetune / REQUEST_FILE, finetune / RUNNING_FILE)
os._exit(137)  # killed before any result was written
"""


async def test_a_unit_that_ends_without_a_result_is_reported(tmp_path: Path) -> None:
    """A claimed request whose unit died before any result: `failed`, naming the unit and
    where to look."""
    finetune, job_dir = _dirs(tmp_path)
    waiting = asyncio.create_task(hand_over(finetune, job_dir, CLAIMED))
    while not (finetune / REQUEST_FILE).exists():
        await asyncio.sleep(0.01)
    subprocess.run([sys.executable, "-c", UNIT_DIES, str(finetune)], check=False, timeout=30)
    report = await asyncio.wait_for(waiting, 30)
    assert report["verdict"] == "failed"
    assert report["reason"] == (
        "the edged-finetune unit ended and left no result (no result.json); "
        "journalctl -u edged-finetune says why"
    )


async def test_a_result_already_there_is_collected_on_resume(tmp_path: Path) -> None:
    """A restarted daemon: no request, no lock holder, a result in the job directory: read."""
    from edged.finetune.job import Result, write_result

    finetune, job_dir = _dirs(tmp_path)
    write_result(job_dir, Result("rejected", "too few hold-out labels", version="1.0.0+local.1"))
    report = await await_unit(finetune, job_dir, SYSTEMD)
    assert report["verdict"] == "rejected" and report["reason"] == "too few hold-out labels"


def test_the_request_carries_the_configured_caps(tmp_path: Path) -> None:
    """memory_mb, threads and timeout_s from [finetune] travel in the request."""
    finetune, job_dir = _dirs(tmp_path)
    cfg = FinetuneConfig(
        launcher="systemd", systemd_start_s=0.05, memory_mb=1024, threads=3, timeout_s=99
    )
    seen: list[bytes] = []

    async def main() -> None:
        task = asyncio.create_task(hand_over(finetune, job_dir, cfg))
        while not (finetune / REQUEST_FILE).exists():
            await asyncio.sleep(0.005)
        seen.append((finetune / REQUEST_FILE).read_bytes())
        await task

    asyncio.run(main())
    assert Request.from_json(seen[0]) == Request(str(job_dir), 1024, 3, 99.0)


@pytest.mark.parametrize("launcher", ["process", "systemd"])
def test_the_launcher_is_process_or_systemd(launcher: str) -> None:
    """Both launchers parse; "process" is the default; the start bound defaults to 60 s."""
    config = parse_config(f'[finetune]\nlauncher = "{launcher}"\n')
    assert config.finetune.launcher == launcher
    assert parse_config("").finetune.launcher == "process"
    assert parse_config("").finetune.systemd_start_s == 60.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            'launcher = "docker"',
            "finetune.launcher: invalid enum value 'docker' (one of 'process', 'systemd')",
        ),
        ("launcher = 1", "finetune.launcher: expected `str`, got `int`"),
        ("systemd_start_s = 0", "finetune.systemd_start_s: expected `float` > 0.0"),
        ("systemd_start_s = 7200", "finetune.systemd_start_s: expected `float` <= 3600.0"),
    ],
)
def test_a_bad_launcher_setting_is_refused_in_one_sentence(text: str, message: str) -> None:
    """Another launcher name or an unbounded start bound is a ConfigError naming the key."""
    with pytest.raises(ConfigError) as caught:
        parse_config(f"[finetune]\n{text}\n", "edged.toml")
    assert str(caught.value) == f"edged.toml: {message}"
