"""What every benchmark shares: result files, run conditions, medians and RSS readings."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edged.atomic import atomic_write

__all__ = [
    "CACHE",
    "REPO",
    "RESULTS",
    "Result",
    "atomic_write",
    "conditions",
    "cpu_model",
    "git_commit",
    "median",
    "percentile",
    "rss_mb",
    "runtime_label",
    "utc_now",
    "write_result",
]

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
CACHE = REPO / "bench" / ".cache"
MIB = 1 << 20


@dataclass
class Result:
    """One benchmark's figures, in the order and shape of BENCHMARKS.md."""

    name: str
    value: float
    unit: str
    baseline: float
    baseline_is: str
    target: str
    metrics: dict[str, Any] = field(default_factory=dict)
    targets: dict[str, str] = field(default_factory=dict)
    conditions: dict[str, Any] = field(default_factory=dict)
    measured_at: str = ""
    commit: str = ""

    @property
    def ratio(self) -> float:
        return self.value / self.baseline if self.baseline else float("nan")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        ordered = {k: data[k] for k in ("name", "value", "unit", "baseline", "baseline_is")}
        ordered["ratio"] = round(self.ratio, 4)
        ordered |= {k: data[k] for k in ("target", "metrics", "targets", "conditions")}
        ordered |= {"measured_at": self.measured_at, "commit": self.commit}
        return ordered


def write_result(result: Result) -> Path:
    """Stamp the result with time and commit and write `bench/results/<name>.json`."""
    result.measured_at = result.measured_at or utc_now()
    result.commit = result.commit or git_commit()
    path = RESULTS / f"{result.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps(result.to_json(), indent=2) + "\n").encode())
    return path


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def git_commit() -> str:
    """`git rev-parse --short HEAD`, or "uncommitted" before the first commit."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "uncommitted"
    return out.stdout.strip()


def git_dirty() -> bool:
    """Whether tracked or new files (other than bench results) differ from HEAD."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--", ".", ":!bench/results"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return True
    return bool(out.stdout.strip())


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform's guess elsewhere), with core count."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model")):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


def runtime_label() -> str:
    """The TFLite runtime edged picks, e.g. "ai-edge-litert 2.3.0"."""
    from edged.runtime import load_runtime

    return load_runtime().label


def conditions(**extra: Any) -> dict[str, Any]:
    """Machine and software conditions every result records, plus the benchmark's own."""
    return {
        **extra,
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "runtime": runtime_label(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "uncommitted_changes": git_dirty(),
    }


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation between closest ranks."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def rss_mb() -> float:
    """This process's resident set size in MiB (VmRSS from /proc/self/status, else psutil)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import psutil

    return float(psutil.Process().memory_info().rss) / MIB
