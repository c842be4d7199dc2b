"""Start the fine-tune worker at low priority: `python -m edged.finetune.launch --nice 19
--memory-mb 2048 --threads 1 JOB_DIR` lowers its own CPU priority (nice) and I/O priority (idle
class), caps its address space and compute threads, then becomes the worker (exec), which keeps
all of them. Done here rather than in a preexec_fn, which is not safe in the daemon's threads."""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from edged.ota.slots import fault_point

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def worker_command(job_dir: Path, *, nice: int, memory_mb: int, threads: int) -> list[str]:
    """The command line that starts the worker on `job_dir` through this launcher."""
    return [
        sys.executable,
        "-m",
        "edged.finetune.launch",
        "--nice",
        str(nice),
        "--memory-mb",
        str(memory_mb),
        "--threads",
        str(threads),
        str(job_dir),
    ]


def kill_worker(pid: int) -> None:
    """SIGKILL the worker's process group (it runs in a session of its own)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def no_result_reason(returncode: int | None, stderr: bytes, fallback: str) -> str:
    """Why a worker that ended without a result.json failed, in one sentence: how it ended
    and the last line it wrote on stderr (else `fallback`)."""
    tail = stderr.decode(errors="replace").strip().splitlines()[-1:] if stderr else []
    died = (
        f"killed by signal {-returncode}"
        if returncode is not None and returncode < 0
        else f"exit status {returncode}"
    )
    return f"the worker left no result ({died}): {tail[0] if tail else fallback}"


def lower_priority(nice: int, memory_mb: int, threads: int) -> None:
    """This process from now on (and whatever it execs): nice `nice`, idle I/O, at most
    `memory_mb` MiB of address space, `threads` compute threads."""
    import psutil  # the finetune extra; the daemon imports this module without it

    os.nice(max(0, nice - os.nice(0)))
    if hasattr(psutil, "IOPRIO_CLASS_IDLE"):  # Linux
        psutil.Process().ionice(psutil.IOPRIO_CLASS_IDLE)
    cap = memory_mb << 20
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    for name in THREAD_ENV:
        os.environ[name] = str(threads)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edged-finetune-launch")
    parser.add_argument("--nice", type=int, default=19, choices=range(0, 20), metavar="0..19")
    parser.add_argument("--memory-mb", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("job_dir")
    args = parser.parse_args(argv)
    lower_priority(args.nice, args.memory_mb, args.threads)
    fault_point("finetune_launched")
    os.execv(sys.executable, [sys.executable, "-m", "edged.finetune.worker", args.job_dir])


if __name__ == "__main__":
    sys.exit(main())
