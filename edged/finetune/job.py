"""The fine-tune job directory (docs/finetune.md, "The worker"): what the daemon writes for the
worker and what the worker writes back.

    JOB_DIR/job.json        Job: bases, version, thresholds, threads, seed   (daemon)
    JOB_DIR/labels.npz      JobLabels: keys, x, y, embeddings, embedded      (daemon)
    JOB_DIR/result.json     Result: verdict, reason, figures                 (worker, last)
    JOB_DIR/candidate.edb   the candidate bundle, when accepted              (worker)
    JOB_DIR/head_delta.npz  weight, bias (and block_weight, block_bias when the block was
                            trained): candidate minus base float weights     (worker)

Every file is written atomically (edged.atomic). A job file the worker cannot use is refused
with one `JobError` sentence naming the field; unknown job fields are refused too (daemon and
worker ship together). A result keeps to the known fields and ignores others. numpy only: the
daemon imports this module, never torch.

    ValueError
    └── JobError   a job, labels or result file that is missing or malformed
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from edged.atomic import atomic_write
from edged.finetune.gate import GatePolicy
from edged_formats.bundle import dump_npz, load_npz
from edged_formats.errors import FormatError

__all__ = [
    "CANDIDATE_FILE",
    "FORMAT",
    "HEAD_DELTA_FILE",
    "JOB_FILE",
    "LABELS_FILE",
    "RESULT_FILE",
    "Job",
    "JobError",
    "JobLabels",
    "Result",
    "Verdict",
    "read_job",
    "read_labels",
    "read_result",
    "write_job",
    "write_result",
]

FORMAT = 1
JOB_FILE = "job.json"
LABELS_FILE = "labels.npz"
RESULT_FILE = "result.json"
CANDIDATE_FILE = "candidate.edb"
HEAD_DELTA_FILE = "head_delta.npz"
MAX_JSON_BYTES = 1 << 20

Verdict = Literal["accepted", "rejected", "failed"]
VERDICTS = ("accepted", "rejected", "failed")
Train = Literal["auto", "head", "block"]
TRAIN = ("auto", "head", "block")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")  # as the manifest allows


class JobError(ValueError):
    """A job directory's file is missing or malformed; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Job:
    """One fine-tune job: which bundles, which version to write, the gate's thresholds and
    the compute budget. Validates on construction."""

    base: str
    base_sha256: str
    current: str
    version: str
    device: str | None = None
    holdout_share: float = 0.25
    min_holdout: int = 20
    min_gain: float = 0.02
    max_replay_loss: float = 0.02
    anchor: float = 0.001
    max_iter: int = 500
    threads: int = 1
    seed: int = 0
    train: Train = "auto"
    block_anchor: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("base", "current"):
            if not getattr(self, name):
                raise JobError(f"job.json field '{name}' must be a non-empty path")
        if not _SHA256.fullmatch(self.base_sha256):
            raise JobError("job.json field 'base_sha256' must be 64 lowercase hex digits")
        if not _VERSION.fullmatch(self.version):
            raise JobError(
                "job.json field 'version' must be 1-64 letters, digits, '.', '_', '+' or '-'"
            )
        bounds: tuple[tuple[str, float, float], ...] = (
            ("holdout_share", 0.0, 1.0),
            ("min_holdout", 1, 1_000_000),
            ("min_gain", 0.0, 1.0),
            ("max_replay_loss", 0.0, 1.0),
            ("anchor", 0.0, 1e6),
            ("block_anchor", 0.0, 1e6),
            ("max_iter", 1, 100_000),
            ("threads", 1, 64),
            ("seed", 0, 2**32 - 1),
        )
        for name, low, high in bounds:
            value = getattr(self, name)
            if not (math.isfinite(value) and low <= value <= high):
                raise JobError(f"job.json field '{name}' is {value}, outside {low:g}..{high:g}")
        if self.holdout_share in (0.0, 1.0):
            raise JobError("job.json field 'holdout_share' must be strictly between 0 and 1")
        if self.train not in TRAIN:
            raise JobError("job.json field 'train' must be 'auto', 'head' or 'block'")

    @property
    def policy(self) -> GatePolicy:
        return GatePolicy(self.min_holdout, self.min_gain, self.max_replay_loss)

    def to_json(self) -> bytes:
        return json.dumps({"format": FORMAT, **asdict(self)}, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Job:
        obj = _json_object(data, JOB_FILE)
        if obj.get("format") != FORMAT:
            raise JobError(f"job.json has format {obj.get('format')!r}, this worker reads {FORMAT}")
        types: dict[str, tuple[type, ...]] = {
            "base": (str,),
            "base_sha256": (str,),
            "current": (str,),
            "version": (str,),
            "device": (str, type(None)),
            "holdout_share": (int, float),
            "min_holdout": (int,),
            "min_gain": (int, float),
            "max_replay_loss": (int, float),
            "anchor": (int, float),
            "max_iter": (int,),
            "threads": (int,),
            "seed": (int,),
            "train": (str,),
            "block_anchor": (int, float),
        }
        unknown = sorted(set(obj) - set(types) - {"format"})
        if unknown:
            raise JobError(f"job.json has unknown field '{unknown[0]}'")
        for name in ("base", "base_sha256", "current", "version"):
            if name not in obj:
                raise JobError(f"job.json lacks the required field '{name}'")
        for name, value in obj.items():
            if name in types and (isinstance(value, bool) or not isinstance(value, types[name])):
                kinds = " or ".join("null" if k is type(None) else k.__name__ for k in types[name])
                raise JobError(
                    f"job.json field '{name}' must be {kinds}, not {type(value).__name__}"
                )
        return cls(**{k: v for k, v in obj.items() if k != "format"})


@dataclass(frozen=True)
class JobLabels:
    """The labelled samples: keys, raw inputs, class indices, and embeddings on the base where
    `embedded` is true (the worker recomputes the other rows)."""

    keys: npt.NDArray[np.str_]
    x: npt.NDArray[Any]
    y: npt.NDArray[np.int64]
    embeddings: npt.NDArray[np.float32]
    embedded: npt.NDArray[np.bool_]

    def __post_init__(self) -> None:
        n = len(self.keys)
        if self.keys.ndim != 1 or self.keys.dtype.kind != "U":
            raise JobError("labels.npz keys must be a vector of strings")
        for name in ("x", "y", "embeddings", "embedded"):
            if len(getattr(self, name)) != n:
                raise JobError(f"labels.npz has {n} keys but {len(getattr(self, name))} {name}")
        if len(set(self.keys.tolist())) != n:
            raise JobError("labels.npz names a sample key more than once")
        if self.x.dtype.kind not in "iuf":
            raise JobError(f"labels.npz x has dtype {self.x.dtype}, not a numeric one")
        if self.y.dtype != np.int64 or self.y.ndim != 1 or (n and self.y.min() < 0):
            raise JobError("labels.npz y must be non-negative int64 class indices")
        if self.embeddings.dtype != np.float32 or self.embeddings.ndim != 2:
            raise JobError("labels.npz embeddings must be float32 [n, E]")
        if self.embedded.dtype != np.bool_ or self.embedded.ndim != 1:
            raise JobError("labels.npz embedded must be a boolean vector")

    def __len__(self) -> int:
        return len(self.keys)

    def to_npz(self) -> bytes:
        return dump_npz(
            keys=self.keys, x=self.x, y=self.y, embeddings=self.embeddings, embedded=self.embedded
        )

    @classmethod
    def from_npz(cls, data: bytes) -> JobLabels:
        try:
            arrays = load_npz(data, LABELS_FILE, ("keys", "x", "y", "embeddings", "embedded"))
        except FormatError as exc:
            raise JobError(str(exc)) from exc
        return cls(**arrays)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Result:
    """What the worker found: the verdict, its one-sentence reason and the figures (None where
    a failed job never measured them)."""

    verdict: Verdict
    reason: str
    version: str | None = None
    labels: int | None = None
    train: int | None = None
    holdout: int | None = None
    replay: int | None = None
    holdout_current: float | None = None
    holdout_candidate: float | None = None
    replay_base: float | None = None
    replay_candidate: float | None = None
    trained: str | None = None
    wall_s: float | None = None
    peak_rss_mb: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise JobError(f"result.json verdict {self.verdict!r} is not one of {VERDICTS}")
        if not isinstance(self.reason, str) or not self.reason:
            raise JobError("result.json has no reason")

    def to_json(self) -> bytes:
        fields = {k: v for k, v in asdict(self).items() if k != "extra"}
        return json.dumps({"format": FORMAT, **fields}, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Result:
        obj = _json_object(data, RESULT_FILE)
        if obj.get("format") != FORMAT:
            raise JobError(f"result.json has format {obj.get('format')!r}, not {FORMAT}")
        known = set(cls.__dataclass_fields__) - {"extra"}
        for name in ("verdict", "reason"):
            if name not in obj:
                raise JobError(f"result.json lacks the required field '{name}'")
        trained = obj.get("trained")
        if trained is not None and trained not in ("head", "block"):
            raise JobError("result.json field 'trained' must be 'head', 'block' or null")
        for name in known - {"verdict", "reason", "version", "trained"}:
            value = obj.get(name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float)
            ):
                raise JobError(f"result.json field '{name}' must be a number or null")
        return cls(
            **{k: v for k, v in obj.items() if k in known},
            extra={k: v for k, v in obj.items() if k not in known and k != "format"},
        )


def write_job(job_dir: Path, job: Job, labels: JobLabels) -> None:
    """Create the job directory with labels.npz and job.json (each atomically; job.json last,
    so a job.json always has its labels)."""
    job_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(job_dir / LABELS_FILE, labels.to_npz())
    atomic_write(job_dir / JOB_FILE, job.to_json())


def read_job(job_dir: Path) -> Job:
    """The job of this directory, or JobError saying what is wrong with job.json."""
    return Job.from_json(_read(job_dir / JOB_FILE))


def read_labels(job_dir: Path) -> JobLabels:
    """The labelled samples of this directory, or JobError saying what is wrong."""
    return JobLabels.from_npz(_read(job_dir / LABELS_FILE, limit=None))


def write_result(job_dir: Path, result: Result) -> None:
    """Write result.json atomically: the worker's last act."""
    atomic_write(job_dir / RESULT_FILE, result.to_json())


def read_result(job_dir: Path) -> Result | None:
    """The worker's result, None when it wrote none (it was killed or never ran), JobError
    when the file is malformed."""
    if not (job_dir / RESULT_FILE).exists():
        return None
    return Result.from_json(_read(job_dir / RESULT_FILE))


def _read(path: Path, limit: int | None = MAX_JSON_BYTES) -> bytes:
    try:
        if limit is not None and path.stat().st_size > limit:
            raise JobError(f"{path.name} is larger than {limit} bytes")
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise JobError(f"the job directory has no {path.name}") from exc
    except OSError as exc:
        raise JobError(f"{path.name} cannot be read ({exc.strerror})") from exc


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(data, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise JobError(f"{what} is not valid JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise JobError(f"{what} must hold a JSON object")
    return obj


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")
