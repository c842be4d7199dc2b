"""The hand-over of a fine-tune job to the `edged-finetune` systemd units (docs/finetune.md,
"Launchers"): the files both sides agree on, in the state directory's `finetune/`.

    finetune/request          Request (JSON), written atomically by the daemon; its existence
                              starts edged-finetune.service (edged-finetune.path, PathExists=)
    finetune/request.running  the request once claimed: the unit renames it here before it runs
                              anything, so the path unit never triggers twice for one request
    finetune/worker.lock      flock()ed by the unit (and its worker) from before the claim until
                              both have exited: "is a worker running?" without seeing processes

The daemon withdraws an unclaimed request by unlinking it; the unit claims by renaming it. Both
are atomic, so exactly one of them wins. Refusals are `JobError` sentences (edged.finetune.job).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from edged.finetune.job import FORMAT, MAX_JSON_BYTES, JobError

__all__ = [
    "LOCK_FILE",
    "REQUEST_FILE",
    "RUNNING_FILE",
    "Request",
    "hold_lock",
    "withdraw",
    "worker_running",
]

REQUEST_FILE = "request"
RUNNING_FILE = "request.running"
LOCK_FILE = "worker.lock"
JOBS_DIR = "jobs"


@dataclass(frozen=True, slots=True)
class Request:
    """One job for the unit: its directory (under `finetune/jobs/`) and the caps the daemon's
    configuration sets (the unit's own MemoryMax= and TimeoutStartSec= bound them from outside).
    """

    job: str
    memory_mb: int = 2048
    threads: int = 1
    timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        if not isinstance(self.job, str) or not os.path.isabs(self.job):
            raise JobError("the request's 'job' must be an absolute directory path")
        checks = (
            ("memory_mb", self.memory_mb >= 256),
            ("threads", 1 <= self.threads <= 64),
            ("timeout_s", math.isfinite(self.timeout_s) and self.timeout_s > 0),
        )
        for name, ok in checks:
            if not ok:
                raise JobError(f"the request's '{name}' is {getattr(self, name)}, out of bounds")

    def to_json(self) -> bytes:
        return json.dumps({"format": FORMAT, **asdict(self)}, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Request:
        if len(data) > MAX_JSON_BYTES:
            raise JobError("the request is larger than a request can be")
        try:
            obj = json.loads(data)
        except ValueError as exc:
            raise JobError(f"the request is not valid JSON ({exc})") from exc
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise JobError(f"the request is not a format {FORMAT} JSON object")
        kinds: dict[str, tuple[type, ...]] = {
            "job": (str,),
            "memory_mb": (int,),
            "threads": (int,),
            "timeout_s": (int, float),
        }
        for name in sorted(set(obj) - {"format"}):
            value = obj[name]
            if name not in kinds:
                raise JobError(f"the request has unknown field '{name}'")
            if isinstance(value, bool) or not isinstance(value, kinds[name]):
                raise JobError(f"the request's '{name}' has the wrong type")
        if "job" not in obj:
            raise JobError("the request names no job directory")
        fields = {k: v for k, v in obj.items() if k != "format"}
        if "timeout_s" in fields:
            fields["timeout_s"] = float(fields["timeout_s"])
        return cls(**fields)

    def job_dir(self, finetune: Path) -> Path:
        """The job directory, resolved, once it is shown to lie in `finetune/jobs/` (the only
        place the unit may write); JobError otherwise."""
        jobs = (finetune / JOBS_DIR).resolve()
        try:
            resolved = Path(self.job).resolve(strict=True)
        except OSError as exc:
            raise JobError(f"the request's job directory {self.job} does not exist") from exc
        if resolved.parent != jobs or not resolved.is_dir():
            raise JobError(
                f"the request's job directory {self.job} is not a directory in {jobs}; refused"
            )
        return resolved


def withdraw(finetune: Path) -> bool:
    """Unlink an unclaimed request: True when this removed it (no unit will run it), False
    when there was none (the unit claimed it first, or nobody wrote one)."""
    try:
        (finetune / REQUEST_FILE).unlink()
    except FileNotFoundError:
        return False
    return True


def worker_running(finetune: Path) -> bool:
    """Whether a unit worker holds the lock now (probed with a non-blocking flock)."""
    try:
        fd = os.open(finetune / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a lock this probe took
    return False


def hold_lock(finetune: Path) -> int:
    """Open and flock the worker lock, waiting while another worker holds it; the descriptor
    (kept open for as long as the lock must be held, and passed to the worker process)."""
    fd = os.open(finetune / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
    return fd
