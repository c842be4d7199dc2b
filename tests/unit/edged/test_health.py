"""Device health from the real /proc and fake /sys and /proc trees; the latency ring."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from edged.health import HealthProbe, LatencyWindow

KEYS = {
    "proc_cpu_percent", "sys_cpu_percent", "proc_rss_mb", "mem_available_mb", "mem_total_mb",
    "load_1m", "disk_free_mb", "disk_total_mb", "disk_used_percent", "temp_c", "uptime_s",
}  # fmt: skip


def thermal(root: Path, **zones: str) -> Path:
    for name, text in zones.items():
        (root / name).mkdir(parents=True)
        (root / name / "temp").write_text(text)
    return root


def burn(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sum(range(1000))


def test_real_proc_values_are_plausible(tmp_path: Path) -> None:
    """On this Linux box every /proc figure is present and in a sane range."""
    probe = HealthProbe(tmp_path, thermal_root=tmp_path / "none")
    first = probe.sample()
    assert set(first) == KEYS
    assert first["proc_cpu_percent"] is None and first["sys_cpu_percent"] is None
    burn(0.3)
    s = probe.sample()
    assert isinstance(s["proc_cpu_percent"], float) and 5 <= s["proc_cpu_percent"] <= 150
    assert isinstance(s["sys_cpu_percent"], float) and 0 < s["sys_cpu_percent"] <= 100
    assert isinstance(s["proc_rss_mb"], float) and 1 < s["proc_rss_mb"] < 10_000
    mem_total, mem_available = s["mem_total_mb"], s["mem_available_mb"]
    assert isinstance(mem_total, float) and isinstance(mem_available, float)
    assert 0 < mem_available <= mem_total
    assert isinstance(s["load_1m"], float) and s["load_1m"] >= 0
    assert isinstance(s["uptime_s"], float) and 0 <= s["uptime_s"] < 7 * 86_400
    assert isinstance(s["disk_total_mb"], float) and isinstance(s["disk_free_mb"], float)
    assert 0 < s["disk_free_mb"] <= s["disk_total_mb"]
    assert isinstance(s["disk_used_percent"], float) and 0 <= s["disk_used_percent"] <= 100
    assert s["temp_c"] is None


def test_temperature_is_the_hottest_zone(tmp_path: Path) -> None:
    """Zones in millidegrees: 45.5 °C and 51 °C report 51.0."""
    root = thermal(tmp_path / "thermal", thermal_zone0="45500\n", thermal_zone1="51000")
    (root / "cooling_device0").mkdir()
    assert HealthProbe(tmp_path, thermal_root=root).sample()["temp_c"] == 51.0


def test_unreadable_zone_is_skipped(tmp_path: Path) -> None:
    """A zone with a corrupt temp file does not hide the others."""
    root = thermal(tmp_path / "t", thermal_zone0="garbage", thermal_zone1="38250\n")
    (root / "thermal_zone2").mkdir()  # no temp file at all
    assert HealthProbe(tmp_path, thermal_root=root).sample()["temp_c"] == 38.25


def test_all_corrupt_or_missing_thermal_is_none(tmp_path: Path) -> None:
    """No thermal directory, or only corrupt zones, gives None."""
    root = thermal(tmp_path / "t", thermal_zone0="", thermal_zone1="hot")
    assert HealthProbe(tmp_path, thermal_root=root).sample()["temp_c"] is None
    assert HealthProbe(tmp_path, thermal_root=tmp_path / "absent").sample()["temp_c"] is None


def test_corrupt_proc_gives_none_never_raises(tmp_path: Path) -> None:
    """Garbled /proc files and a missing state dir turn into None, twice in a row."""
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "stat").write_text("123 (edged) S 1 2")
    (proc / "self" / "status").write_text("Name:\tedged\nVmRSS:\tlots kB\n")
    (proc / "stat").write_text("intr 1 2 3\n")
    (proc / "meminfo").write_text("MemTotal: 1000 kB\n")
    (proc / "loadavg").write_text("")
    probe = HealthProbe(tmp_path / "gone", thermal_root=tmp_path / "x", proc_root=proc)
    for _ in range(2):
        s = probe.sample()
        assert s.pop("mem_total_mb") == pytest.approx(1000 / 1024, abs=0.01)
        assert set(s.values()) == {None}


def test_fake_proc_cpu_percent_with_a_fake_clock(tmp_path: Path) -> None:
    """CPU percentages are counter deltas over the elapsed time between samples."""
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    hz = os.sysconf("SC_CLK_TCK")
    now = [10.0]

    def write(utime: int, busy: int, idle: int) -> None:
        rest = " ".join(["S", *["0"] * 10, str(utime), "0", *["0"] * 6, "500"])
        (proc / "self" / "stat").write_text(f"7 (a (b) c) {rest}\n")
        (proc / "stat").write_text(f"cpu  {busy} 0 0 {idle} 0 0 0 0 0 0\ncpu0 1 0 0 1\n")
        (proc / "uptime").write_text("1000.00 3000.00\n")

    probe = HealthProbe(tmp_path, proc_root=proc, clock=lambda: now[0])
    write(0, 100, 100)
    assert probe.sample()["proc_cpu_percent"] is None
    write(hz // 2, 175, 125)  # half a second of CPU; 75 busy of 100 jiffies
    now[0] += 1.0
    s = probe.sample()
    assert s["proc_cpu_percent"] == 50.0 and s["sys_cpu_percent"] == 75.0
    assert s["uptime_s"] == pytest.approx(1000 - 500 / hz, abs=0.01)


def test_latency_percentiles_on_a_known_sequence() -> None:
    """1..100 ms gives numpy's linear-interpolated p50, p90, p99 in milliseconds."""
    window = LatencyWindow(capacity=128)
    assert window.percentiles() == {"p50_ms": None, "p90_ms": None, "p99_ms": None}
    window.add_many(i / 1000 for i in range(1, 101))
    assert window.count == 100
    assert window.percentiles() == pytest.approx({"p50_ms": 50.5, "p90_ms": 90.1, "p99_ms": 99.01})


def test_latency_ring_evicts_oldest() -> None:
    """Past capacity the oldest values go: only the last four values remain."""
    window = LatencyWindow(capacity=4)
    window.add_many([9.0, 9.0, 9.0])
    window.add_many([1.0, 2.0])
    window.add(3.0)
    window.add(float("nan"))
    assert window.count == 4
    assert window.percentiles()["p50_ms"] == pytest.approx(2500.0)  # {9, 1, 2, 3} -> 2.5 s
    window.add_many(range(100))  # more than capacity in one go: the last four stay
    assert window.count == 4
    assert window.percentiles()["p50_ms"] == pytest.approx(97_500.0)
    with pytest.raises(ValueError, match="capacity"):
        LatencyWindow(capacity=0)
