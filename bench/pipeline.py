"""Pipeline benchmark: the whole `edged run` daemon's per-sample cost against a bare invoke loop.

Value: a real daemon (`python -m edged.cli run`, a child process) streaming a `replay` source at
full speed (no `rate_hz`, `loop = true`) through MobileNetV2-int8-224, 1 thread, `max_batch`,
gating and drift at their defaults; results published on the local bus and the uplink enabled,
both to a Mosquitto the benchmark starts; state (outbox, sample store) in a temporary directory,
`outbox.min_free_mb = 0`. Its per-sample cost is a window's wall time over the samples inferred
in it, read from the status socket's `counts.inferred` at both ends, in ms/sample.

Baseline: a persistent child process running a tight `set_tensor; invoke; get_tensor` loop on
a plain `ai_edge_litert` Interpreter of the same .tflite, 1 thread (XNNPACK default), batch 1,
fed the replay file's first sample already quantised, for a window of the same length.

Interleaving: both processes live through all rounds and only one runs at a time; the daemon
is frozen with SIGSTOP while the bare loop runs (the bare child blocks on its stdin while the
daemon runs) and given `RESUME_S` after SIGCONT before its window starts. The order alternates
each round; each figure is the median of the rounds. The same is done with the digits
reference model (`control_plane.toolchain.reference`, 8x8 grey digits), where the invoke is
tiny and the difference, `overhead_us_small_model`, is the daemon's own per-sample cost.

Memory, all VmRSS from /proc/<pid>/status:
- `rss_mb`: median over a fresh daemon's long full-speed MobileNetV2 replay (`EDGED_BENCH_RSS_S`
  seconds, default 600, sampled every `RSS_EVERY_S`), after a `RSS_WARMUP_S` warm-up;
- `rss_growth_mb`: median of the last minute minus median of the first minute after warm-up
  (a minute is shortened to a third of the measured span on short runs);
  `rss_growth_fit_mb` is the least-squares slope times the measured span, for comparison;
- `rss_idle_mb`: a daemon with the model loaded, bus and uplink connected and no source;
- `rss_floor_mb`: "python + numpy + ai_edge_litert, load the .tflite, invoke once", as
  bench/engine.py measures its floor (median of fresh processes): what edged cannot go below;
- `rss_mb_max_batch_1` / `ms_per_sample_max_batch_1`: a shorter full-speed run with
  `max_batch = 1`, to show what the batch-8 interpreter costs in memory and buys in speed.

The replay files hold raw uint8 frames, as a camera or the digits data set delivers them (the
engine's input map quantises them); `batch_mean` is counts.inferred / counts.batches.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import numpy as np

from bench.common import CACHE, REPO, Result, atomic_write, conditions, median
from bench.models import _key, mobilenet_v2, raw_images

__all__ = ["run"]

THREADS = 1
REPETITIONS = 7
WINDOW_S = {"mobilenetv2": 10.0, "digits": 5.0}
WARMUP_S = 8.0  # after READY, before the first round
RESUME_S = 2.0  # after SIGCONT, before a daemon window
REPLAY_IMAGES = 32  # distinct MobileNetV2 frames in the replay file (4.8 MB)
RSS_S = float(os.environ.get("EDGED_BENCH_RSS_S", "600"))
RSS_EVERY_S = 2.0
RSS_WARMUP_S = 30.0
RSS_MINUTE_S = 60.0
BATCH1_S = 90.0  # a shorter full-speed run with max_batch = 1: where the memory goes
IDLE_S = 10.0
FLOOR_SPAWNS = 5
READY_TIMEOUT_S = 120.0
TARGETS = {
    "rss_mb": "rss_mb <= 60",
    "rss_growth_mb": "rss_growth_mb <= 1",  # "no growth": within 1 MiB over the run
}
_DIGITS_SOURCES = (
    "control_plane/toolchain/reference.py",
    "control_plane/toolchain/datasets.py",
    "control_plane/toolchain/nets.py",
    "control_plane/toolchain/convert.py",
    "edged/packer.py",
    "edged_formats",
)
_DIGITS_PACKAGES = (
    "torch",
    "litert-torch",
    "ai-edge-quantizer",
    "ai-edge-litert",
    "numpy",
    "scikit-learn",
)
_LOG_PROBLEM = re.compile(r"level=(warning|error|critical)|Traceback", re.IGNORECASE)

# The baseline, and the floor: loads the model, invokes once, prints its memory; then, for each
# number of seconds read from stdin, runs the bare loop that long and prints what it did.
_BARE_CHILD = """
import json, sys, time
import numpy as np
from ai_edge_litert.interpreter import Interpreter
model, sample, scale, offset = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
it = Interpreter(model_path=model, num_threads=1)
it.allocate_tensors()
detail = it.get_input_details()[0]
values = np.load(sample)[None].astype(np.float64) * scale + offset
q_scale, zero_point = detail["quantization"]
if q_scale:
    info = np.iinfo(detail["dtype"])
    values = np.clip(np.rint(values / q_scale + zero_point), info.min, info.max)
x = np.ascontiguousarray(values.astype(detail["dtype"]))
index, output = detail["index"], it.get_output_details()[0]["index"]
set_tensor, invoke, get_tensor, clock = it.set_tensor, it.invoke, it.get_tensor, time.perf_counter
set_tensor(index, x); invoke(); get_tensor(output)
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
print(json.dumps({"rss_kb": int(status["VmRSS"].split()[0])}), flush=True)
for line in sys.stdin:
    n, start = 0, clock()
    end = start + float(line)
    while True:
        set_tensor(index, x); invoke(); get_tensor(output)
        n += 1
        now = clock()
        if now >= end:
            break
    print(json.dumps({"n": n, "s": now - start}), flush=True)
"""


@dataclass(frozen=True)
class _Model:
    name: str
    bundle: Path
    tflite: Path
    replay: Path  # .npz with the raw samples as `x`
    scale: float
    offset: float


@dataclass
class _Window:
    ms_per_sample: float
    samples: int
    batches: int
    cpu_ms_per_sample: float  # the daemon's CPU time (all threads) per sample
    broker_cpu_ms_per_sample: float


def run() -> Result:
    from bench.mqtt_baseline import _mosquitto_version
    from control_plane.local_broker import MosquittoBroker

    started = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="edged-bench-pipeline-") as tmp,
        MosquittoBroker() as broker,
    ):
        work = Path(tmp)
        big, small = _mobilenet(work), _digits()
        env = _Env(work, broker.host, broker.port, broker.pid)
        rounds = {model.name: _interleaved(env, model) for model in (big, small)}
        idle = _idle_rss(env, big)
        floor = median([_floor_rss_kb(big, work) for _ in range(FLOOR_SPAWNS)]) / 1024
        rss = _rss_run(env, big, RSS_S)
        batch1 = _rss_run(env, big, min(BATCH1_S, RSS_S), max_batch=1)
        broker_version = _mosquitto_version(str(broker.binary))
    big_rounds, small_rounds = rounds[big.name], rounds[small.name]
    value = median([w.ms_per_sample for w in big_rounds["daemon"]])
    baseline = median(big_rounds["bare"])
    small_value = median([w.ms_per_sample for w in small_rounds["daemon"]])
    small_bare = median(small_rounds["bare"])
    per_round = [
        w.ms_per_sample / b for w, b in zip(big_rounds["daemon"], big_rounds["bare"], strict=True)
    ]
    small_pairs = [
        (w.ms_per_sample - b) * 1000
        for w, b in zip(small_rounds["daemon"], small_rounds["bare"], strict=True)
    ]
    metrics: dict[str, Any] = {
        "overhead_us_small_model": round((small_value - small_bare) * 1000, 1),
        "overhead_us_small_model_paired": round(median(small_pairs), 1),
        "pipeline_us_small_model": round(small_value * 1000, 1),
        "bare_us_small_model": round(small_bare * 1000, 1),
        "ratio_small_model": round(small_value / small_bare, 3),
        "rss_mb": rss["rss_mb"],
        "rss_growth_mb": rss["rss_growth_mb"],
        "rss_growth_fit_mb": rss["rss_growth_fit_mb"],
        "rss_max_mb": rss["rss_max_mb"],
        "rss_peak_mb": rss["rss_peak_mb"],
        "rss_idle_mb": round(idle, 2),
        "rss_floor_mb": round(floor, 2),
        "rss_over_floor_mb": round(rss["rss_mb"] - floor, 2),
        "ratio_min": round(min(per_round), 4),
        "ratio_max": round(max(per_round), 4),
        "overhead_us": round((value - baseline) * 1000, 1),
        **_batch_and_cpu(big_rounds["daemon"], ""),
        **_batch_and_cpu(small_rounds["daemon"], "_small_model"),
        "rounds_ms_per_sample": [round(w.ms_per_sample, 3) for w in big_rounds["daemon"]],
        "rounds_bare_ms": [round(b, 3) for b in big_rounds["bare"]],
        "rounds_us_small_model": [round(w.ms_per_sample * 1000, 1) for w in small_rounds["daemon"]],
        "rounds_bare_us_small_model": [round(b * 1000, 1) for b in small_rounds["bare"]],
        "rss_mb_max_batch_1": batch1["rss_mb"],
        "ms_per_sample_max_batch_1": batch1["ms_per_sample"],
        "rss_run_ms_per_sample": rss["ms_per_sample"],
        "rss_run_samples": rss["samples"],
        "rss_run_counts": rss["counts"],
        "rss_series_mb": rss["series"],
        "daemon_log_problems": env.problems,
        "measure_s": round(time.perf_counter() - started, 1),
    }
    return Result(
        name="pipeline",
        value=round(value, 4),
        unit="ms/sample",
        baseline=round(baseline, 4),
        baseline_is=(
            "bare ai_edge_litert Interpreter set_tensor/invoke/get_tensor loop in its own "
            "process, same int8 .tflite, same threads, batch 1, pre-quantised input; "
            "interleaved with the daemon (frozen by SIGSTOP while the bare loop runs)"
        ),
        target="ratio <= 1.10",
        metrics=metrics,
        targets=TARGETS,
        conditions=conditions(
            model="mobilenetv2-int8-224",
            model_weights="random (torch seed 0), BatchNorm statistics from 32 random images",
            small_model="digits-cnn (control_plane.toolchain.reference, 8x8x1)",
            threads=THREADS,
            max_batch=8,
            repetitions=REPETITIONS,
            window_s=WINDOW_S,
            warmup_s=WARMUP_S,
            resume_s=RESUME_S,
            replay=(
                f"{REPLAY_IMAGES} random uint8 224x224x3 frames, loop, full speed; digits: the "
                "held-out split (uint8), loop, full speed"
            ),
            daemon="edged run: replay source, gating/drift defaults, local results bus and "
            "uplink on one Mosquitto, outbox.min_free_mb = 0, state in a temporary directory",
            rss_duration_s=RSS_S,
            rss_every_s=RSS_EVERY_S,
            rss_warmup_s=min(RSS_WARMUP_S, RSS_S / 4),
            max_batch_1_run_s=min(BATCH1_S, RSS_S),
            rss_growth_is="median of the last minute - median of the first minute after warm-up",
            floor_spawns=FLOOR_SPAWNS,
            broker=broker_version,
        ),
    )


def _batch_and_cpu(windows: list[_Window], suffix: str) -> dict[str, float]:
    samples = sum(w.samples for w in windows)
    return {
        f"batch_mean{suffix}": round(samples / max(1, sum(w.batches for w in windows)), 2),
        f"daemon_cpu_ms_per_sample{suffix}": round(
            median([w.cpu_ms_per_sample for w in windows]), 4
        ),
        f"broker_cpu_ms_per_sample{suffix}": round(
            median([w.broker_cpu_ms_per_sample for w in windows]), 4
        ),
    }


# -- models ---------------------------------------------------------------------------------


def _mobilenet(work: Path) -> _Model:
    try:
        model = mobilenet_v2()
    except FileNotFoundError as exc:
        # bench/models.py writes into its cache folder without creating it first.
        Path(str(exc.filename)).parent.mkdir(parents=True, exist_ok=True)
        model = mobilenet_v2()
    replay = work / "mobilenetv2-replay.npz"
    np.savez(replay, x=raw_images(REPLAY_IMAGES, seed=1))
    return _with_quantisation("mobilenetv2", model.int8_bundle, model.int8_tflite, replay)


def _digits() -> _Model:
    """The digits reference bundle, its .tflite and its held-out stream, built on first use."""
    folder = CACHE / f"digits-{_key(_DIGITS_SOURCES, _DIGITS_PACKAGES)}"
    bundle, tflite, replay = (
        folder / "digits-cnn-1.0.0.bundle",
        folder / "int8.tflite",
        folder / "digits-test.npz",
    )
    if not (bundle.exists() and tflite.exists() and replay.exists()):
        from control_plane.toolchain.reference import build_reference
        from edged.engine import open_bundle

        for stale in CACHE.glob("digits-*"):
            shutil.rmtree(stale)
        build_reference("digits", folder)
        atomic_write(tflite, open_bundle(bundle).model)
    return _with_quantisation("digits", bundle, tflite, replay)


def _with_quantisation(name: str, bundle: Path, tflite: Path, replay: Path) -> _Model:
    from edged.engine import open_bundle

    spec = open_bundle(bundle).manifest.input
    return _Model(name, bundle, tflite, replay, spec.scale, spec.offset)


# -- processes ------------------------------------------------------------------------------


class _Env:
    """Where daemons run and which broker they talk to; collects their log problems."""

    def __init__(self, work: Path, host: str, port: int, broker_pid: int | None) -> None:
        self.work, self.host, self.port, self.broker_pid = work, host, port, broker_pid
        self.problems: list[str] = []
        self._count = 0

    def daemon(self, model: _Model, *, replay: bool, max_batch: int = 8) -> _Daemon:
        self._count += 1
        home = self.work / f"daemon{self._count}"
        source = {"kind": "replay", "name": "bench", "path": str(model.replay), "loop": True}
        config: dict[str, Any] = {
            "device": {"state_dir": str(home / "state"), "model": str(model.bundle)},
            "engine": {"threads": THREADS, "max_batch": max_batch},
            "source": [source] if replay else [],
            "local_mqtt": {"host": self.host, "port": self.port},
            "uplink": {"enabled": True, "host": self.host, "port": self.port},
            "outbox": {"min_free_mb": 0},
            "status": {"socket": str(home / "status.sock")},
            "log": {"level": "info", "format": "kv"},
        }
        return _Daemon(home, config, self.problems)


class _Daemon:
    """One `edged run` child: status over its socket, memory and CPU from /proc."""

    def __init__(self, home: Path, config: dict[str, Any], problems: list[str]) -> None:
        home.mkdir(parents=True)
        self.home, self.socket = home, config["status"]["socket"]
        self.config_path = home / "edged.toml"
        self.config_path.write_text(_toml(config))
        self.log_path = home / "daemon.log"
        self._problems = problems
        self._log: IO[bytes] | None = None
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> _Daemon:
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "edged.cli", "run", "--config", str(self.config_path)],
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._wait_ready()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self.process is not None and self._log is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.send_signal(signal.SIGTERM)
            try:
                code = self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                code = self.process.wait(10)
            if code != 0:
                self._problems.append(f"{self.home.name}: exit code {code} after SIGTERM")
        self._log.close()
        log = self.log_path.read_text(errors="replace")
        self._problems.extend(
            f"{self.home.name}: {line.strip()[:300]}"
            for line in log.splitlines()
            if _LOG_PROBLEM.search(line)
        )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"edged exited ({self.process.returncode}):\n{self._tail()}")
            with contextlib.suppress(OSError, ValueError):
                if self.status()["state"] == "running":
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"edged not ready after {READY_TIMEOUT_S} s:\n{self._tail()}")
            time.sleep(0.1)

    def _tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def status(self) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(self.socket)
            data = b"".join(iter(lambda: sock.recv(65536), b""))
        return json.loads(data)

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def memory_kb(self) -> dict[str, int]:
        return _proc_memory_kb(self.pid)


class _Bare:
    """The persistent baseline child: `window(seconds)` -> ms per invoke."""

    def __init__(self, model: _Model, work: Path) -> None:
        sample = work / f"{model.name}-sample.npy"
        with np.load(model.replay) as data:
            np.save(sample, np.asarray(data["x"][0]))
        numbers = (repr(model.scale), repr(model.offset))
        self.process = subprocess.Popen(
            [sys.executable, "-c", _BARE_CHILD, str(model.tflite), str(sample), *numbers],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.loaded = self._answer()

    def _answer(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"bare child failed ({self.process.wait()})")
        return json.loads(line)

    def window(self, seconds: float) -> float:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{seconds}\n")
        self.process.stdin.flush()
        answer = self._answer()
        return float(answer["s"]) * 1000 / int(answer["n"])

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextlib.contextmanager
def _bare(model: _Model, work: Path) -> Iterator[_Bare]:
    bare = _Bare(model, work)
    try:
        yield bare
    finally:
        bare.close()


# -- measurements ---------------------------------------------------------------------------


def _interleaved(env: _Env, model: _Model) -> dict[str, Any]:
    """REPETITIONS rounds of one daemon window and one bare window, alternating which first."""
    seconds = WINDOW_S[model.name]
    daemon_windows: list[_Window] = []
    bare_ms: list[float] = []
    with _bare(model, env.work) as bare, env.daemon(model, replay=True) as daemon:
        time.sleep(WARMUP_S)
        daemon.pause()
        bare.window(2.0)  # warm-up

        def daemon_round() -> None:
            daemon.resume()
            time.sleep(RESUME_S)
            daemon_windows.append(_daemon_window(daemon, seconds, env.broker_pid))
            daemon.pause()

        def bare_round() -> None:
            bare_ms.append(bare.window(seconds))

        for index in range(REPETITIONS):
            order: tuple[Callable[[], None], ...] = (daemon_round, bare_round)
            for step in order if index % 2 == 0 else order[::-1]:
                step()
        daemon.resume()
        final = daemon.status()
    env.problems.extend(_status_problems(model.name, final))
    return {"daemon": daemon_windows, "bare": bare_ms}


def _daemon_window(daemon: _Daemon, seconds: float, broker_pid: int | None) -> _Window:
    before, t0, cpu0, broker0 = _reading(daemon, broker_pid)
    time.sleep(seconds)
    after, t1, cpu1, broker1 = _reading(daemon, broker_pid)
    samples = after["counts"]["inferred"] - before["counts"]["inferred"]
    batches = after["counts"]["batches"] - before["counts"]["batches"]
    if samples <= 0:
        raise RuntimeError(f"the daemon inferred nothing in {seconds} s: {after}")
    return _Window(
        (t1 - t0) * 1000 / samples,
        samples,
        batches,
        (cpu1 - cpu0) * 1000 / samples,
        (broker1 - broker0) * 1000 / samples,
    )


def _reading(daemon: _Daemon, broker_pid: int | None) -> tuple[dict[str, Any], float, float, float]:
    """Status, the midpoint of its request, and the daemon's and broker's CPU seconds."""
    asked = time.monotonic()
    status = daemon.status()
    answered = time.monotonic()
    broker = _cpu_s(broker_pid) if broker_pid is not None else 0.0
    return status, (asked + answered) / 2, _cpu_s(daemon.pid), broker


def _idle_rss(env: _Env, model: _Model) -> float:
    """Median VmRSS (MiB) of a daemon with the model loaded and no source."""
    with env.daemon(model, replay=False) as daemon:
        time.sleep(2.0)
        readings = []
        for _ in range(int(IDLE_S)):
            readings.append(daemon.memory_kb()["VmRSS"] / 1024)
            time.sleep(1.0)
    return median(readings)


def _floor_rss_kb(model: _Model, work: Path) -> float:
    bare = _Bare(model, work)
    bare.close()
    return float(bare.loaded["rss_kb"])


def _rss_run(env: _Env, model: _Model, duration: float, max_batch: int = 8) -> dict[str, Any]:
    """A fresh daemon replaying at full speed for `duration` s, VmRSS every RSS_EVERY_S."""
    series: list[tuple[float, float]] = []
    warmup = min(RSS_WARMUP_S, duration / 4)
    with env.daemon(model, replay=True, max_batch=max_batch) as daemon:
        started = time.monotonic()
        first: dict[str, Any] | None = None
        t_first = 0.0
        while (elapsed := time.monotonic() - started) < duration:
            series.append((elapsed, daemon.memory_kb()["VmRSS"] / 1024))
            if first is None and elapsed >= warmup:
                first, t_first = daemon.status(), time.monotonic()
            time.sleep(RSS_EVERY_S)
        last, t_last = daemon.status(), time.monotonic()
        peak = daemon.memory_kb()["VmHWM"] / 1024
    env.problems.extend(_status_problems(f"rss run (max_batch {max_batch})", last))
    first = first or last
    inferred = last["counts"]["inferred"] - first["counts"]["inferred"]
    steady = [(t, mb) for t, mb in series if t >= warmup]
    span = steady[-1][0] - steady[0][0]
    minute = min(RSS_MINUTE_S, span / 3)
    head = [mb for t, mb in steady if t < steady[0][0] + minute]
    tail = [mb for t, mb in steady if t > steady[-1][0] - minute]
    slope = float(np.polyfit([t for t, _ in steady], [mb for _, mb in steady], 1)[0])
    return {
        "rss_mb": round(median([mb for _, mb in steady]), 2),
        "rss_growth_mb": round(median(tail) - median(head), 2),
        "rss_growth_fit_mb": round(slope * span, 2),
        "rss_max_mb": round(max(mb for _, mb in steady), 2),
        "rss_peak_mb": round(peak, 2),
        "ms_per_sample": round((t_last - t_first) * 1000 / inferred, 3) if inferred else None,
        "samples": last["counts"]["inferred"],
        "counts": {
            **last["counts"],
            "gating": last["gating"],
            "outbox": last["outbox"],
            "uplink": last["uplink"],
            "local_bus": last["local_bus"],
            "bad_input": last["bad_input"],
            "drift_alarms": len(last["drift"].get("alarms", [])),
        },
        "series": [[round(t), round(mb, 1)] for t, mb in series[:: max(1, len(series) // 60)]],
    }


def _status_problems(what: str, status: dict[str, Any]) -> list[str]:
    problems = []
    if status["counts"].get("write_failures"):
        problems.append(f"{what}: {status['counts']['write_failures']} write failures")
    if status.get("bad_input"):
        problems.append(f"{what}: bad input {status['bad_input']}")
    if status.get("uplink") and status["uplink"].get("error"):
        problems.append(f"{what}: uplink error {status['uplink']['error']}")
    return problems


# -- /proc and TOML -------------------------------------------------------------------------


def _proc_memory_kb(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, value = line.split(":", 1)
            fields[key] = int(value.split()[0])
    return fields


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of every thread of `pid`."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _toml(config: dict[str, Any], prefix: str = "") -> str:
    """TOML for nested dicts of strings, numbers and booleans; lists of dicts are tables."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return repr(v) if isinstance(v, int | float) else json.dumps(str(v))

    lines = [f"{k} = {value(v)}" for k, v in config.items() if not isinstance(v, dict | list)]
    for key, item in config.items():
        if isinstance(item, dict):
            lines += ["", f"[{prefix}{key}]", _toml(item, f"{prefix}{key}.")]
        elif isinstance(item, list):
            for table in item:
                lines += ["", f"[[{prefix}{key}]]", _toml(table, f"{prefix}{key}.")]
    return "\n".join(lines).strip() + "\n"
