"""The edged-finetune.service entry as a real process: it claims the request before anything
else, so the request is gone on every way out (refused, failed, killed, over time, stopped,
nothing to do), refuses a job directory outside finetune/jobs/, and leaves a `failed` result
with its reason whenever the worker wrote none."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edged.finetune.job import read_result
from edged.finetune.request import REQUEST_FILE, RUNNING_FILE, Request, worker_running

psutil = pytest.importorskip("psutil", reason="the finetune extra (psutil) is not installed")


def _setup(tmp_path: Path, **request: object) -> tuple[Path, Path]:
    finetune, job_dir = tmp_path / "finetune", tmp_path / "finetune" / "jobs" / "1"
    job_dir.mkdir(parents=True)
    (job_dir / "job.json").write_text('{"format": 1}')  # the worker refuses it: failed
    fields: dict[str, object] = {"job": str(job_dir)} | request
    (finetune / REQUEST_FILE).write_bytes(Request(**fields).to_json())  # type: ignore[arg-type]
    return finetune, job_dir


def _entry(finetune: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "edged.finetune.service", str(finetune / REQUEST_FILE)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def _gone(finetune: Path) -> None:
    assert not (finetune / REQUEST_FILE).exists(), "the request is still there: a retrigger"
    assert not (finetune / RUNNING_FILE).exists()
    assert worker_running(finetune) is False


def test_a_failing_worker_leaves_its_result_and_no_request(tmp_path: Path) -> None:
    """A job the worker refuses: exit 2, the worker's failed result, the request gone."""
    finetune, job_dir = _setup(tmp_path)
    entry = _entry(finetune)
    _, stderr = entry.communicate(timeout=60)
    assert entry.returncode == 2, stderr
    result = read_result(job_dir)
    assert result is not None and result.verdict == "failed"
    assert "job.json lacks the required field" in result.reason
    assert "edged-finetune: job 1: failed: job.json lacks" in stderr
    _gone(finetune)


def test_a_job_directory_outside_finetune_jobs_is_refused(tmp_path: Path) -> None:
    """A request naming a directory elsewhere: one sentence, exit 2, nothing written there,
    the request gone."""
    finetune, _ = _setup(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (finetune / REQUEST_FILE).write_bytes(Request(str(elsewhere)).to_json())
    entry = _entry(finetune)
    _, stderr = entry.communicate(timeout=60)
    assert entry.returncode == 2
    assert stderr.strip().splitlines() == [
        f"edged-finetune: refused: the request's job directory {elsewhere} is not a directory "
        f"in {(finetune / 'jobs').resolve()}; refused"
    ]
    assert list(elsewhere.iterdir()) == []
    _gone(finetune)


def test_a_malformed_request_is_refused_and_removed(tmp_path: Path) -> None:
    """A request that is not JSON: exit 2 with the sentence, the request gone."""
    finetune, _ = _setup(tmp_path)
    (finetune / REQUEST_FILE).write_bytes(b"job=/tmp")
    entry = _entry(finetune)
    _, stderr = entry.communicate(timeout=60)
    assert entry.returncode == 2 and "refused: the request is not valid JSON" in stderr
    _gone(finetune)


def test_no_request_means_nothing_to_do(tmp_path: Path) -> None:
    """Started with no request (the daemon withdrew it): exit 0, nothing written."""
    finetune, job_dir = _setup(tmp_path)
    (finetune / REQUEST_FILE).unlink()
    entry = _entry(finetune)
    _, stderr = entry.communicate(timeout=60)
    assert entry.returncode == 0 and "no request to run" in stderr
    assert read_result(job_dir) is None
    _gone(finetune)


def _stopped_worker(entry: subprocess.Popen[str]) -> psutil.Process:
    """The entry's worker once it stopped itself at the finetune_launched fault point."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for child in psutil.Process(entry.pid).children(recursive=True):
            try:
                if child.status() == psutil.STATUS_STOPPED:
                    return child
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.05)
    entry.kill()
    _, stderr = entry.communicate(timeout=30)
    raise AssertionError(f"the worker never reached its fault point: {stderr[-2000:]}")


PAUSE = {"EDGED_FAULT_PAUSE_AT": "finetune_launched"}


def test_kill_9_of_the_worker_is_reported_in_its_result(tmp_path: Path) -> None:
    """The worker killed (as by the OOM killer): the entry writes `failed` with the signal,
    holds the lock until then, and removes the request."""
    finetune, job_dir = _setup(tmp_path)
    entry = _entry(finetune, PAUSE)
    worker = _stopped_worker(entry)
    assert not (finetune / REQUEST_FILE).exists()  # claimed before the worker started
    assert worker_running(finetune) is True
    worker.kill()
    _, stderr = entry.communicate(timeout=30)
    assert entry.returncode == 2, stderr
    result = read_result(job_dir)
    assert result is not None and result.verdict == "failed"
    assert result.reason.startswith("the worker left no result (killed by signal 9)")
    _gone(finetune)


def test_a_worker_over_the_request_timeout_is_stopped_and_reported(tmp_path: Path) -> None:
    """The request's timeout_s: the worker is killed and the result says it ran over."""
    # long enough for the worker to reach its fault point on a loaded machine
    finetune, job_dir = _setup(tmp_path, timeout_s=5.0)
    entry = _entry(finetune, PAUSE)
    worker = _stopped_worker(entry)
    entry.communicate(timeout=30)
    assert entry.returncode == 2
    result = read_result(job_dir)
    assert result is not None and result.reason == "the worker ran over 5 s"
    assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE
    _gone(finetune)


def test_sigterm_of_the_unit_leaves_a_failed_result(tmp_path: Path) -> None:
    """SIGTERM (a stop, or TimeoutStartSec= running out): the worker is killed, the result
    says the unit was stopped."""
    finetune, job_dir = _setup(tmp_path)
    entry = _entry(finetune, PAUSE)
    _stopped_worker(entry)
    entry.send_signal(signal.SIGTERM)
    entry.communicate(timeout=30)
    assert entry.returncode == 2
    result = read_result(job_dir)
    assert result is not None and "was stopped (SIGTERM)" in result.reason
    _gone(finetune)
