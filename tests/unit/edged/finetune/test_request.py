"""The request file the daemon hands to the edged-finetune unit: round trip, malformed requests
refused with one sentence, job directories outside finetune/jobs/ refused, the withdraw/claim
race and the worker lock probe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edged.finetune.job import JobError
from edged.finetune.request import (
    LOCK_FILE,
    REQUEST_FILE,
    Request,
    hold_lock,
    withdraw,
    worker_running,
)


def test_a_request_round_trips() -> None:
    """to_json then from_json gives back the same request, in format 1."""
    request = Request("/state/finetune/jobs/3", memory_mb=1024, threads=2, timeout_s=60.0)
    assert Request.from_json(request.to_json()) == request
    assert json.loads(request.to_json())["format"] == 1


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "is not valid JSON"),
        (b"[]", "is not a format 1 JSON object"),
        (json.dumps({"format": 2, "job": "/j"}).encode(), "is not a format 1 JSON object"),
        (json.dumps({"format": 1}).encode(), "names no job directory"),
        (json.dumps({"format": 1, "job": "jobs/1"}).encode(), "must be an absolute"),
        (json.dumps({"format": 1, "job": "/j", "memory_mb": "1"}).encode(), "'memory_mb' has"),
        (json.dumps({"format": 1, "job": "/j", "threads": 0}).encode(), "'threads' is 0"),
        (json.dumps({"format": 1, "job": "/j", "timeout_s": True}).encode(), "'timeout_s' has"),
        (json.dumps({"format": 1, "job": "/j", "nice": 0}).encode(), "unknown field 'nice'"),
    ],
)
def test_malformed_requests_are_refused_with_one_sentence(body: bytes, message: str) -> None:
    """Each malformed request raises JobError naming what is wrong."""
    with pytest.raises(JobError, match=message):
        Request.from_json(body)


def test_the_job_directory_must_lie_in_finetune_jobs(tmp_path: Path) -> None:
    """A job directory in finetune/jobs/ resolves; one elsewhere, the jobs directory itself, a
    symlink out of it, or a missing one is refused."""
    finetune = tmp_path / "finetune"
    (finetune / "jobs" / "1").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (finetune / "jobs" / "2").symlink_to(tmp_path / "elsewhere")
    inside = Request(str(finetune / "jobs" / "1"))
    assert inside.job_dir(finetune) == (finetune / "jobs" / "1").resolve()
    for job in (tmp_path / "elsewhere", finetune / "jobs", finetune / "jobs" / "2"):
        with pytest.raises(JobError, match=r"is not a directory in .*; refused"):
            Request(str(job)).job_dir(finetune)
    with pytest.raises(JobError, match="does not exist"):
        Request(str(finetune / "jobs" / "9")).job_dir(finetune)


def test_withdraw_wins_only_over_an_unclaimed_request(tmp_path: Path) -> None:
    """withdraw() removes a request that is there (True) and reports False once it is gone."""
    (tmp_path / REQUEST_FILE).write_bytes(b"{}")
    assert withdraw(tmp_path) is True
    assert not (tmp_path / REQUEST_FILE).exists()
    assert withdraw(tmp_path) is False


def test_the_lock_probe_sees_a_worker_in_another_process(tmp_path: Path) -> None:
    """worker_running() is False without a lock file or holder, True while another process
    holds the lock, and probing does not take the lock away."""
    assert worker_running(tmp_path) is False
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from edged.finetune.request import "
            "hold_lock; hold_lock(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        assert worker_running(tmp_path) is True
        assert worker_running(tmp_path) is True
    finally:
        holder.kill()
        holder.communicate()
    assert worker_running(tmp_path) is False
    fd = hold_lock(tmp_path)
    try:
        assert (tmp_path / LOCK_FILE).exists()
    finally:
        os.close(fd)
