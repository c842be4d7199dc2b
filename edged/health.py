"""Device health for telemetry, read straight from Linux's /proc and /sys (no psutil).

`HealthProbe.sample()` keys (MB are MiB; None when the source is unreadable or absent):

    proc_cpu_percent   this process since the previous sample, top-style: 100 = one core
    sys_cpu_percent    all cores since the previous sample, 0-100 (/proc/stat)
    proc_rss_mb        VmRSS          mem_available_mb / mem_total_mb   MemAvailable / MemTotal
    load_1m            /proc/loadavg  uptime_s                          this process's age
    disk_free_mb / disk_total_mb / disk_used_percent   state_dir's filesystem, df-style
    temp_c             hottest thermal_zone*/temp, None on boards without thermal zones

Both CPU percentages are None on the first call: there is no earlier sample to diff against.
`LatencyWindow` keeps the most recent inference latencies for p50/p90/p99.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

__all__ = ["HealthProbe", "LatencyWindow"]

Sample = dict[str, float | int | None]
_TICKS = os.sysconf("SC_CLK_TCK")
_MB = 1024 * 1024
_ERRORS = (OSError, ValueError, IndexError, KeyError, ZeroDivisionError)


def _safe(read: Callable[[], float | None]) -> float | None:
    try:
        return read()
    except _ERRORS:
        return None


class HealthProbe:
    """Reads health figures on demand; keeps the previous CPU counters between samples."""

    def __init__(
        self,
        state_dir: Path,
        thermal_root: Path = Path("/sys/class/thermal"),
        proc_root: Path = Path("/proc"),
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.state_dir, self.thermal_root, self.proc_root = state_dir, thermal_root, proc_root
        self._clock = clock
        self._proc_prev: tuple[float, float] | None = None  # (clock, cpu seconds)
        self._sys_prev: tuple[int, int] | None = None  # (busy jiffies, total jiffies)

    def sample(self) -> Sample:
        """One reading of every figure; never raises."""
        out: Sample = {
            "proc_cpu_percent": _safe(self._proc_cpu),
            "sys_cpu_percent": _safe(self._sys_cpu),
            "proc_rss_mb": _safe(lambda: self._kib("self/status", "VmRSS") / 1024),
            "mem_available_mb": _safe(lambda: self._kib("meminfo", "MemAvailable") / 1024),
            "mem_total_mb": _safe(lambda: self._kib("meminfo", "MemTotal") / 1024),
            "load_1m": _safe(lambda: float(self._read("loadavg").split()[0])),
            "temp_c": _safe(self._temperature),
            "uptime_s": _safe(self._uptime),
        }
        try:
            disk = shutil.disk_usage(self.state_dir)
            out["disk_free_mb"] = round(disk.free / _MB, 1)
            out["disk_total_mb"] = round(disk.total / _MB, 1)
            out["disk_used_percent"] = round(100 * disk.used / (disk.used + disk.free), 1)
        except _ERRORS:
            out |= {"disk_free_mb": None, "disk_total_mb": None, "disk_used_percent": None}
        return {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}

    def _read(self, name: str) -> str:
        return (self.proc_root / name).read_text()

    def _kib(self, name: str, field: str) -> int:
        for line in self._read(name).splitlines():
            key, _, rest = line.partition(":")
            if key == field:
                return int(rest.split()[0])
        raise KeyError(field)

    def _stat_fields(self) -> list[str]:
        # comm (field 2) may hold spaces and ')': split after its last ')'; [0] is field 3
        return self._read("self/stat").rpartition(")")[2].split()

    def _proc_cpu(self) -> float | None:
        fields = self._stat_fields()
        now, cpu = self._clock(), (int(fields[11]) + int(fields[12])) / _TICKS
        prev, self._proc_prev = self._proc_prev, (now, cpu)
        if prev is None or now <= prev[0]:
            return None
        return max(0.0, 100 * (cpu - prev[1]) / (now - prev[0]))

    def _sys_cpu(self) -> float | None:
        line = self._read("stat").splitlines()[0].split()
        if line[0] != "cpu":
            raise ValueError("no aggregate cpu line")
        jiffies = [int(v) for v in line[1:9]]  # user..steal; guest is already in user
        total, idle = sum(jiffies), jiffies[3] + jiffies[4]  # idle + iowait
        prev, self._sys_prev = self._sys_prev, (total - idle, total)
        if prev is None or total <= prev[1]:
            return None
        return 100 * (total - idle - prev[0]) / (total - prev[1])

    def _uptime(self) -> float:
        started = int(self._stat_fields()[19]) / _TICKS
        return max(0.0, float(self._read("uptime").split()[0]) - started)

    def _temperature(self) -> float | None:
        temps = []
        for zone in self.thermal_root.glob("thermal_zone*"):
            try:  # some zones fail to read (EINVAL, ENODATA) while others work
                temps.append(int((zone / "temp").read_text().strip()) / 1000)
            except (OSError, ValueError):
                continue
        return max(temps, default=None)


class LatencyWindow:
    """A ring of the last `capacity` latencies in seconds; non-finite values are dropped."""

    def __init__(self, capacity: int = 1024) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._ring = np.zeros(capacity, dtype=np.float64)
        self._next = 0
        self.count = 0

    def add(self, value: float) -> None:
        self.add_many((value,))

    def add_many(self, values: Iterable[float]) -> None:
        """Append values, oldest evicted first once the ring is full."""
        arr = np.fromiter(values, dtype=np.float64)
        arr = arr[np.isfinite(arr)][-len(self._ring) :]
        index = (self._next + np.arange(len(arr))) % len(self._ring)
        self._ring[index] = arr
        self._next = (self._next + len(arr)) % len(self._ring)
        self.count = min(self.count + len(arr), len(self._ring))

    def percentiles(self) -> dict[str, float | None]:
        """p50_ms, p90_ms, p99_ms (numpy's linear interpolation); None when empty."""
        if self.count == 0:
            return {"p50_ms": None, "p90_ms": None, "p99_ms": None}
        held = self._ring if self.count == len(self._ring) else self._ring[: self.count]
        p50, p90, p99 = np.percentile(held * 1000, [50, 90, 99])
        return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99)}
