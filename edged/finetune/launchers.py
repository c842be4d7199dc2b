"""The daemon's two ways of running the fine-tune worker on a written job directory
(docs/finetune.md, "Launchers"), chosen by `[finetune] launcher`:

- "process": a child of the daemon through edged.finetune.launch (nice 19, idle I/O, the
  address-space cap, the threads), killed at `timeout_s` or when the daemon stops. For
  development, tests and the demo; under systemd the child would share edged.service's cgroup
  and sandbox.
- "systemd": the job is handed to edged-finetune.path / edged-finetune.service through the
  request file (edged.finetune.request), which the unprivileged daemon can do without starting
  units itself. The unit must claim the request within `systemd_start_s`, else the daemon
  withdraws it; once claimed, the worker is done when it releases the worker lock.

Either returns the job's report fields: the result's figures and the wall time, or `failed`
with one sentence.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edged.atomic import atomic_write
from edged.config import FinetuneConfig
from edged.finetune.job import JobError, read_result
from edged.finetune.launch import kill_worker, no_result_reason, worker_command
from edged.finetune.request import REQUEST_FILE, Request, withdraw, worker_running
from edged.logs import log_event

__all__ = ["MARGIN_S", "await_unit", "hand_over", "not_started", "run_process"]

MARGIN_S = 120.0  # beyond timeout_s: the unit stops its worker at timeout_s itself
POLL_S = (0.05, 1.0)  # first and longest pause between looks at the files

log = logging.getLogger("edged.finetune")


def not_started(start_s: float) -> str:
    return (
        f"the edged-finetune.path unit did not start the worker within {start_s:g} s; "
        "is it enabled?"
    )


async def run_process(job_dir: Path, cfg: FinetuneConfig) -> dict[str, Any]:
    """The worker as the daemon's child: its result, or `failed` when it died, timed out or
    wrote nothing."""
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        *worker_command(job_dir, nice=19, memory_mb=cfg.memory_mb, threads=cfg.threads),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    log_event(log, "info", "finetune_started", job=job_dir.name, pid=process.pid)
    try:
        async with asyncio.timeout(cfg.timeout_s):
            _, stderr = await process.communicate()
    except TimeoutError:
        kill_worker(process.pid)
        await process.wait()
        return {"verdict": "failed", "reason": f"the worker ran over {cfg.timeout_s:g} s"}
    except asyncio.CancelledError:
        kill_worker(process.pid)  # a stop: the worker does not outlive the daemon
        raise
    wall = round(time.monotonic() - started, 2)
    return await _collect(
        job_dir, wall, lambda why: no_result_reason(process.returncode, stderr, why)
    )


async def hand_over(finetune: Path, job_dir: Path, cfg: FinetuneConfig) -> dict[str, Any]:
    """Write the request for `job_dir` and wait for the unit's worker (await_unit)."""
    request = Request(str(job_dir), cfg.memory_mb, cfg.threads, cfg.timeout_s)
    try:
        await asyncio.to_thread(atomic_write, finetune / REQUEST_FILE, request.to_json())
    except OSError as exc:
        return {"verdict": "failed", "reason": f"cannot write the request ({exc.strerror})"}
    log_event(log, "info", "finetune_requested", job=job_dir.name)
    return await await_unit(finetune, job_dir, cfg)


async def await_unit(finetune: Path, job_dir: Path, cfg: FinetuneConfig) -> dict[str, Any]:
    """Wait for the unit to claim the request and for its worker to end, then read the result.
    Also what a restarted daemon does for a job an earlier run of it handed over. Cancelling
    leaves request and worker alone: the next start of the daemon collects the result."""
    started = time.monotonic()
    pause = POLL_S[0]
    while await asyncio.to_thread((finetune / REQUEST_FILE).exists):
        if time.monotonic() - started > cfg.systemd_start_s:
            if await asyncio.to_thread(withdraw, finetune):
                log_event(log, "error", "finetune_not_started", job=job_dir.name)
                return {"verdict": "failed", "reason": not_started(cfg.systemd_start_s)}
            break  # claimed just now
        await asyncio.sleep(pause)
        pause = min(pause * 2, POLL_S[1])
    claimed = time.monotonic()
    log_event(log, "info", "finetune_started", job=job_dir.name, launcher="systemd")
    bound = cfg.timeout_s + MARGIN_S
    while await asyncio.to_thread(worker_running, finetune):
        if time.monotonic() - claimed > bound:
            reason = f"the edged-finetune unit's worker still ran after {bound:g} s"
            return {"verdict": "failed", "reason": reason}
        await asyncio.sleep(pause)
        pause = min(pause * 2, POLL_S[1])
    wall = round(time.monotonic() - started, 2)
    return await _collect(job_dir, wall, _unit_left_no_result)


def _unit_left_no_result(why: str) -> str:
    return (
        f"the edged-finetune unit ended and left no result ({why}); "
        "journalctl -u edged-finetune says why"
    )


async def _collect(job_dir: Path, wall: float, explain: Callable[[str], str]) -> dict[str, Any]:
    """The result's figures, or `failed` with `explain(what is wrong with result.json)`."""
    try:
        result = await asyncio.to_thread(read_result, job_dir)
        if result is None:
            raise JobError("no result.json")
    except (OSError, JobError) as exc:
        return {"verdict": "failed", "reason": explain(str(exc)), "wall_s": wall}
    figures = {k: v for k, v in asdict(result).items() if k != "extra" and v is not None}
    return {**figures, "worker_wall_s": wall}
