"""The entry of edged-finetune.service: `python -m edged.finetune.service REQUEST`, REQUEST being
`/var/lib/edged/finetune/request` (docs/finetune.md, "Launchers"; the files in
edged.finetune.request).

1. Take the worker lock (waiting while another worker holds it).
2. Claim the request: rename it to `request.running`. From here on the request file is gone
   whatever happens, so the path unit (PathExists=) does not start this unit again for it. A
   request the daemon withdrew first is simply not there: nothing to do.
3. Refuse a request whose job directory is not a directory in `finetune/jobs/`.
4. Run the worker on it through edged.finetune.launch (the request's address-space cap and
   threads; systemd sets nice, I/O class, CPU and I/O weights and the memory cap) with the
   request's timeout, passing it the lock so the lock outlives neither of them.
5. When the worker left no result (killed, out of memory, over the timeout, or this unit
   stopped), write the `failed` result with the sentence the daemon's process launcher would
   give. Then release the lock: the daemon reads result.json once the lock is free.

Exit status: 0 with nothing to do or an accepted/rejected result, 2 with a failed result or a
refused request, 3 when the lock or the result could not be written.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from edged.finetune.job import JobError, Result, read_result, write_result
from edged.finetune.launch import kill_worker, no_result_reason, worker_command
from edged.finetune.request import RUNNING_FILE, Request, hold_lock

__all__ = ["main"]


class _Stopped(Exception):
    """SIGTERM: a stop of the unit, or systemd's TimeoutStartSec= running out."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edged.finetune.service")
    parser.add_argument("request", type=Path, help="the request file, e.g. STATE/finetune/request")
    request_path: Path = parser.parse_args(argv).request
    finetune = request_path.parent
    running = finetune / RUNNING_FILE
    try:
        lock = hold_lock(finetune)
    except OSError as exc:
        _say(f"cannot take the worker lock in {finetune} ({exc.strerror})")
        return 3
    try:
        try:
            os.rename(request_path, running)
        except FileNotFoundError:
            _say("no request to run: the daemon withdrew it, or it ran already")
            return 0
        try:
            request = Request.from_json(running.read_bytes())
            job_dir = request.job_dir(finetune)
        except (OSError, JobError) as exc:
            _say(f"refused: {exc}")
            return 2
        return _supervise(job_dir, request, lock)
    finally:
        running.unlink(missing_ok=True)
        os.close(lock)


def _supervise(job_dir: Path, request: Request, lock: int) -> int:
    """Run the worker on `job_dir`; make sure a result is there when it ends."""
    started = time.monotonic()
    command = worker_command(job_dir, nice=19, memory_mb=request.memory_mb, threads=request.threads)
    _say(f"job {job_dir.name}: the worker starts")
    try:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            pass_fds=(lock,),
            start_new_session=True,
        )
    except OSError as exc:
        return _fail(job_dir, f"cannot start the worker ({exc.strerror})", started)
    reason: str | None = None
    stderr = b""
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        try:
            _, stderr = process.communicate(timeout=request.timeout_s)
        except subprocess.TimeoutExpired:
            reason = f"the worker ran over {request.timeout_s:g} s"
        except _Stopped:
            reason = "the edged-finetune unit was stopped (SIGTERM) while the worker ran"
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the result is written in any case
        if process.returncode is None:
            kill_worker(process.pid)
            _, stderr = process.communicate()
        signal.signal(signal.SIGTERM, previous)
    if stderr:
        sys.stderr.buffer.write(stderr)  # to the journal
        sys.stderr.flush()
    try:
        result = None if reason else read_result(job_dir)
    except JobError as exc:
        result, reason = None, f"the worker's result.json is unreadable: {exc}"
    if result is None:
        if reason is None:
            reason = no_result_reason(process.returncode, stderr, "no result.json")
        return _fail(job_dir, reason, started)
    _say(f"job {job_dir.name}: {result.verdict}: {result.reason}")
    return 0 if result.verdict in ("accepted", "rejected") else 2


def _fail(job_dir: Path, reason: str, started: float) -> int:
    """Write the `failed` result the worker did not: 2, or 3 when it cannot be written."""
    try:
        write_result(job_dir, Result("failed", reason, wall_s=round(time.monotonic() - started, 3)))
    except OSError as exc:
        _say(f"job {job_dir.name}: cannot write the failed result ({exc.strerror})")
        return 3
    _say(f"job {job_dir.name}: failed: {reason}")
    return 2


def _stop(_signum: int, _frame: FrameType | None) -> None:
    raise _Stopped


def _say(message: str) -> None:
    print(f"edged-finetune: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
