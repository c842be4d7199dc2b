"""Ingest benchmark: 1,000 enrolled devices publishing telemetry through a real broker into a
real `edged-control-plane serve` on PostgreSQL, against the same database's batched-insert rate.

Set-up (outside every clock): a fresh PostgreSQL database (migrated by the control plane's own
`migrate`), a dynamic-security Mosquitto (the tests' configuration, `max_queued_messages`
raised so a backlog is never dropped), and the control plane with its production ingest
settings (batch 2,000 messages, linger 50 ms, device cache 5 s). `DEVICES` devices are
enrolled through the API (`edged.enrollment.enroll` with a fresh one-time token each, the
device's own code path: real rows, real dynsec accounts and passwords), `ENROLL_THREADS` at a
time, while `PUBLISHERS` worker processes pre-encode every message their devices will send:
signed wire batches (`encode_batch_raw`, ed25519) of `RECORDS_PER_MESSAGE` telemetry records
with distinct (boot, seq), bodies shaped like the daemon's (`status()` plus `health`), drawn
from a pool of `BODY_POOL` snapshots per worker (later phases' messages are encoded before
each phase, outside its clock). Each worker then holds one paho MQTT 5 client per device (its
own username, password and client id), all driven by one selector loop.

Two layouts of the control plane, each measured through every phase below on an emptied
telemetry table, on the same enrolled devices and broker:

- `split` (the value): `INGEST_REPLICAS` `serve` processes consuming one shared subscription
  group at nice `INGEST_NICE` (systemd's Nice=; the broker holds whatever they have not taken
  yet), and one more with `ingest = false` that the API client talks to, at nice 0: the
  scaled-out shape docs/control-plane.md describes;
- `single_process`: one `serve` process doing both, as a one-machine install runs.

The publishers run at nice `PUBLISHERS_NICE`: they stand in for devices, which are not on the
control plane's machine.

Phases (every figure of the rounds is their median):

- calibration: the workers publish QoS 1 at paced offered rates (open loop, round-robin over
  their devices) stepping through `STEPS` records/s, `STEP_S` each, until the records ingest
  stores (its /metrics counter) fall clearly behind the offer; then the backlog drains.
- ingest rounds (`ROUNDS`): `CATCHUP_MARGIN` times the rate ingest managed (the calibration's
  best step, then the previous round), so each round saturates ingest without leaving a long
  backlog, for `WARMUP_S` + `WINDOW_S` s. `SELECT count(*) FROM telemetry` at the start and end
  of the window gives the records/s committed (not sent). Meanwhile one client issues, in turn,
  `GET /v1/devices?limit=100` (a random page) and `GET /v1/devices/{id}/telemetry` (a random
  device, the last 15 minutes in 10 s buckets), one request at a time, recording each latency.
  Then the workers stop and the backlog drains (every published record stored).
- ceiling, after each round: asyncpg straight to the same table: multi-row `INSERT ... ON
  CONFLICT (device_id, boot, seq) DO NOTHING RETURNING seq` statements of up to 1,000 rows
  (SQLAlchemy's insertmanyvalues page, what ingest sends), one transaction per ingest-sized
  batch (the round's mean records per ingest transaction), rows made by the ingest's own
  planner from the same kind of messages with bodies already serialised: no MQTT, no
  decoding, no device updates. Then the same rows again through binary COPY into a staging
  table and one INSERT ... SELECT per transaction (`ceiling_copy_records_per_s`, what ingest
  itself does on PostgreSQL for batches of 64 rows or more).

value = ingest records/s, baseline = ceiling records/s. CPU figures are cores (CPU seconds per
wall second) over the windows: control plane, Mosquitto, every PostgreSQL process, publishers,
this process, and `other`: whatever else the machine ran meanwhile (it is shared).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import math
import multiprocessing as mp
import os
import random
import re
import selectors
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import cbor2

from bench.common import Result, conditions, median, percentile

__all__ = ["run"]

DEVICES = 1000
PUBLISHERS = 4  # worker processes, DEVICES / PUBLISHERS MQTT connections each
RECORDS_PER_MESSAGE = 20
STEPS = (1250.0, 2500.0, 5000.0, 10_000.0, 20_000.0, 40_000.0)  # offered records/s, calibration
STEP_S = 4.0
MAX_OFFERED = 40_000.0
CATCHUP_MARGIN = 1.15
ROUNDS = 3
WARMUP_S = 5.0
WINDOW_S = 30.0
TAIL_S = 1.0  # publishing goes on this long past the window's end
DRAIN_TIMEOUT_S = 120.0
ENROLL_THREADS = 8
BODY_POOL = 256
CEILING_ROWS = 100_000  # per round
IDLE_API_S = 5.0  # the API's latency before any load, for comparison
PAGE_ROWS = 1000  # SQLAlchemy's insertmanyvalues page size
API_PAUSE_S = 0.02
API_SINCE_S = 900.0
API_BUCKET_S = 10.0
GROUP = "bench"
INGEST_REPLICAS = 2  # the split layout: this many ingest processes and one API-only process
# The publishers stand in for devices elsewhere on the network: their CPU is the test rig's,
# so the control plane's processes come first on these shared cores.
PUBLISHERS_NICE = 10
INGEST_NICE = 10  # the split layout's ingest replicas: the broker holds what they have not taken
# the production ingest defaults, and one shared-subscription group for every replica
CP_SETTINGS = {
    "ingest_batch": "2000",
    "ingest_linger_s": "0.05",
    "device_cache_s": "5",
    "ingest_group": "bench-ingest",
}
PG_ADMIN_URL = os.environ.get("EDGED_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
BROKER_ADMIN = "edged-control-plane"
PLACEHOLDER = "dev-" + "0" * 16  # every device id has this length
TARGETS = {"p99_ms": "p99_ms <= 50", "rejected": "rejected == 0", "lost": "lost == 0"}
_TELEMETRY_COLUMNS = (
    "device_id",
    "boot",
    "seq",
    "ts_ms",
    "received_at",
    "rate_per_s",
    "queue_depth",
    "outbox_depth",
    "latency_p99_ms",
    "cpu_percent",
    "rss_mb",
    "temp_c",
    "uncertain_share",
    "body",
)


# -- what a device sends ----------------------------------------------------------------------


def _status_body(device: str, n: int, rng: random.Random) -> dict[str, Any]:
    """One telemetry body shaped like edged.daemon's `status()` plus `health`."""
    inferred = n * 20 + rng.randrange(20)
    uncertain = inferred // 12
    return {
        "device_id": device,
        "software_version": "0.1.0",
        "state": "running",
        "uptime_s": round(n * 0.05, 1),
        "model": {"name": "mobilenetv2-int8-224", "version": "3"},
        "rate_per_s": round(rng.uniform(15, 25), 2),
        "queue_depth": rng.randrange(8),
        "counts": {
            "received": inferred + 3,
            "inferred": inferred,
            "batches": inferred // 4,
            "kept": uncertain // 3,
            "uploaded": uncertain // 4,
            "write_failures": 0,
        },
        "per_class": {"ok": inferred - uncertain, "defect": uncertain},
        "gating": {
            "confident": inferred - uncertain,
            "uncertain": uncertain,
            "audit": inferred // 100,
            "uploaded": uncertain // 4,
            "suppressed_duplicate": 0,
            "suppressed_hourly_budget": uncertain // 10,
            "suppressed_daily_bytes": 0,
            "suppressed_class_quota": 0,
        },
        "drift": {
            "enabled": True,
            "samples": inferred,
            "windows": inferred // 256,
            "reference_confidence": 0.9312,
            "window_confidence": round(rng.uniform(0.85, 0.95), 4),
            "confidence_psi": round(rng.uniform(0, 0.1), 4),
            "confidence_psi_alarm": False,
            "feature_shift": round(rng.uniform(0, 2), 4),
            "feature_shift_alarm": False,
            "confidence_cusum": round(rng.uniform(0, 1), 4),
            "confidence_cusum_alarm": False,
            "alarms": [],
        },
        "latency_ms": {
            "p50_ms": round(rng.uniform(8, 10), 3),
            "p90_ms": round(rng.uniform(10, 13), 3),
            "p99_ms": round(rng.uniform(13, 20), 3),
        },
        "bad_input": {},
        "outbox": {"depth": rng.randrange(50), "bytes": rng.randrange(50_000), "dropped": 0},
        "uplink": {"state": "connected", "records": n, "error": ""},
        "local_bus": None,
        "health": {
            "proc_cpu_percent": round(rng.uniform(20, 60), 2),
            "sys_cpu_percent": round(rng.uniform(30, 70), 2),
            "proc_rss_mb": round(rng.uniform(60, 70), 2),
            "mem_available_mb": 1500.0,
            "mem_total_mb": 3906.0,
            "load_1m": round(rng.uniform(0.5, 2), 2),
            "temp_c": round(rng.uniform(45, 60), 2),
            "uptime_s": 86_400.0 + n,
            "disk_free_mb": 20_000.0,
            "disk_total_mb": 30_000.0,
            "disk_used_percent": 33.3,
        },
    }


def _body_pool(seed: int) -> list[bytes]:
    """Canonical CBOR of `BODY_POOL` status bodies, each naming PLACEHOLDER as its device."""
    rng = random.Random(seed)
    return [
        cbor2.dumps(_status_body(PLACEHOLDER, n, rng), canonical=True) for n in range(BODY_POOL)
    ]


class _Signer:
    """One device's next messages: signed telemetry batches of RECORDS_PER_MESSAGE records
    with seq 1, 2, ... (boot 1), bodies from a pool with the device's own id spliced in."""

    def __init__(self, device: str, key: Any, pool: Sequence[bytes], rng: random.Random) -> None:
        self.device, self.key, self.pool, self.rng = device, key, pool, rng
        self.own = device.encode()
        self.seq = 0
        self.started = time.time()

    def message(self) -> bytes:
        from edged_formats.wire import encode_batch_raw, encode_record_parts

        records = []
        for _ in range(RECORDS_PER_MESSAGE):
            self.seq += 1
            body = self.rng.choice(self.pool).replace(PLACEHOLDER.encode(), self.own, 1)
            created = self.started + self.seq * 0.05
            records.append(encode_record_parts("telemetry", 1, self.seq, created, body))
        return encode_batch_raw(self.device, "telemetry", records, self.key)


# -- a publisher process -------------------------------------------------------------------


@dataclass
class _Plan:
    index: int
    host: str
    port: int
    devices: list[tuple[str, bytes]]  # (device id, key seed)


def _publisher(plan: _Plan, conn: Connection) -> None:
    """One worker process: serves the coordinator's commands until "stop"."""
    try:
        _Publisher(plan, conn).serve()
    except BaseException as exc:  # reported, then the process ends
        with contextlib.suppress(OSError):
            conn.send(("error", repr(exc)))
        raise


class _Publisher:
    """Commands: ("prepare", n) tops every device's queue up to n pre-encoded messages;
    ("connect", passwords) opens one MQTT client per device; ("run", rate, seconds) publishes;
    ("stop",) disconnects and ends. Each is answered with one message."""

    def __init__(self, plan: _Plan, conn: Connection) -> None:
        from nacl.signing import SigningKey

        self.plan, self.conn = plan, conn
        pool = _body_pool(plan.index)
        rng = random.Random(1000 + plan.index)
        self.signers = {d: _Signer(d, SigningKey(seed), pool, rng) for d, seed in plan.devices}
        self.queues: dict[str, collections.deque[bytes]] = {
            d: collections.deque() for d in self.signers
        }
        self.clients: dict[str, Any] = {}
        self.selector = selectors.DefaultSelector()
        self.acked = 0
        self.failed: list[int] = []
        self.connected: set[str] = set()
        self.refused: dict[str, str] = {}
        self.pending_write: set[Any] = set()

    def serve(self) -> None:
        self.selector.register(self.conn, selectors.EVENT_READ, None)
        while True:
            command = self._wait_command()
            started = time.perf_counter()
            if command[0] == "stop":
                break
            if command[0] == "prepare":
                for device, queue in self.queues.items():
                    while len(queue) < command[1]:
                        queue.append(self.signers[device].message())
                self.conn.send(("prepared", time.perf_counter() - started))
            elif command[0] == "connect":
                self._connect(command[1])
                self.conn.send(("connected", time.perf_counter() - started))
            else:
                _, rate, duration = command
                self.conn.send(("ran", *self._publish(rate, duration)))
        for client in self.clients.values():
            client.disconnect()

    def _client(self, device: str, password: str) -> Any:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device, protocol=mqtt.MQTTv5)
        client.username_pw_set(device, password)

        def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            if reason.is_failure:
                self.refused[device] = str(reason)
            else:
                self.connected.add(device)

        def on_publish(_c: Any, _u: Any, _mid: int, reason: Any, _p: Any) -> None:
            if reason.is_failure:
                self.failed.append(int(reason.value))
            else:
                self.acked += 1

        client.on_connect, client.on_publish = on_connect, on_publish
        return client

    def _connect(self, passwords: dict[str, str]) -> None:
        for device in self.signers:
            client = self._client(device, passwords[device])
            client.connect(self.plan.host, self.plan.port, keepalive=60)
            self.clients[device] = client
            self.selector.register(client.socket(), selectors.EVENT_READ, client)
        deadline = time.monotonic() + 60
        while len(self.connected) + len(self.refused) < len(self.clients):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(self.connected)} of {len(self.clients)} connected")
            self._io(0.05)
        if self.refused:
            raise RuntimeError(f"broker refused {len(self.refused)} devices: {self.refused}")

    def _io(self, timeout: float) -> bool:
        """Serve the sockets once; whether a command is waiting on the pipe."""
        command = False
        for key, _events in self.selector.select(timeout):
            if key.data is None:
                command = True
            else:
                key.data.loop_read(100)
                if key.data.want_write():
                    self.pending_write.add(key.data)
        for client in list(self.pending_write):
            client.loop_write()
            if not client.want_write():
                self.pending_write.discard(client)
        return command

    def _misc(self) -> None:
        for client in self.clients.values():
            client.loop_misc()

    def _wait_command(self) -> Any:
        last_misc = time.monotonic()
        while not self._io(1.0):
            if time.monotonic() - last_misc > 5:
                self._misc()
                last_misc = time.monotonic()
        return self.conn.recv()

    def _publish(self, rate: float, duration: float) -> tuple[int, int, int, float, float]:
        """Publish at `rate` messages/s for `duration` s, round-robin over the devices, then
        wait for every PUBACK: (sent, acked, refused, CPU seconds, seconds behind schedule)."""
        cpu, self.acked, self.failed = time.process_time(), 0, []
        devices = list(self.clients)
        total = int(rate * duration)
        started = time.monotonic()
        last_misc = started
        sent = 0
        while sent < total:
            now = time.monotonic()
            due = min(total, int((now - started) * rate) + 1)
            while sent < due:
                device = devices[sent % len(devices)]
                if not self.queues[device]:
                    raise RuntimeError(f"{device} ran out of pre-encoded messages")
                client = self.clients[device]
                payload = self.queues[device].popleft()
                info = client.publish(f"edged/v1/{device}/telemetry", payload, qos=1)
                if info.rc != 0:
                    raise RuntimeError(f"publish failed locally: {info.rc}")
                if client.want_write():
                    self.pending_write.add(client)
                sent += 1
            if now - last_misc > 5:
                self._misc()
                last_misc = now
            self._io(max(0.0, started + sent / rate - time.monotonic()))
        late = time.monotonic() - started - duration
        deadline = time.monotonic() + 30
        while self.acked + len(self.failed) < sent and time.monotonic() < deadline:
            self._io(0.05)
        return sent, self.acked, len(self.failed), time.process_time() - cpu, late


@dataclass
class _Worker:
    process: Any
    conn: Connection
    devices: list[str]

    def expect(self, kind: str, timeout: float) -> tuple[Any, ...]:
        if not self.conn.poll(timeout):
            raise RuntimeError(f"publisher {self.process.pid} sent no '{kind}' in {timeout} s")
        try:
            message: tuple[Any, ...] = self.conn.recv()
        except EOFError:
            raise RuntimeError(
                f"publisher {self.process.pid} exited ({self.process.exitcode})"
            ) from None
        if message[0] != kind:
            raise RuntimeError(f"publisher {self.process.pid}: {message}")
        return message


# -- the control plane side -------------------------------------------------------------------


@dataclass
class _Window:
    offered: float  # records/s
    records_per_s: float
    saturated: bool  # committed clearly less than offered
    published_records: int
    cpu: dict[str, float]  # cores
    records_per_batch: float
    batch_ms: float
    drain_s: float
    pacing_late_s: float
    count_query_s: float
    encode_s: float


@dataclass
class _Rounds:
    staircase: list[tuple[float, float]] = field(default_factory=list)
    staircase_drain_s: float = 0.0
    windows: list[_Window] = field(default_factory=list)
    ceiling: list[float] = field(default_factory=list)
    ceiling_copy: list[float] = field(default_factory=list)
    ceiling_batch: list[int] = field(default_factory=list)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    idle_latencies: dict[str, list[float]] = field(default_factory=dict)
    api_errors: list[str] = field(default_factory=list)


def _metric(text: str, name: str, labels: str = "") -> float:
    """Sum of the samples of `name` (with `labels` in their label set) in /metrics text."""
    total = 0.0
    pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})? ([-+0-9.eE]+|NaN)$", re.M)
    for match in pattern.finditer(text):
        if labels in (match.group(1) or ""):
            total += float(match.group(2))
    return total


class _CpuMeter:
    """CPU seconds of the control plane, Mosquitto, every PostgreSQL process, this process
    (publishers' coordinator and the API client) and the whole machine."""

    def __init__(self, cp_pids: Sequence[int], broker_pid: int, workers: Sequence[int]) -> None:
        import psutil

        self.psutil = psutil
        self.fixed = {
            "control_plane": [psutil.Process(pid) for pid in cp_pids],
            "mosquitto": [psutil.Process(broker_pid)],
            "publishers": [psutil.Process(pid) for pid in workers],
            "benchmark": [psutil.Process()],
        }

    def read(self) -> dict[str, float]:
        out = {k: sum(_cpu_s(p) for p in procs) for k, procs in self.fixed.items()}
        pg = 0.0
        for proc in self.psutil.process_iter(["name"]):
            if proc.info["name"] == "postgres":
                with contextlib.suppress(self.psutil.Error):
                    pg += _cpu_s(proc)
        out["postgresql"] = pg
        times = self.psutil.cpu_times()
        busy = times.user + times.nice + times.system
        busy += getattr(times, "irq", 0.0) + getattr(times, "softirq", 0.0)
        out["other"] = busy - sum(out.values())  # anything else running on the machine
        out["machine"] = busy
        return out


def _cpu_s(proc: Any) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


class _Api:
    """Closed-loop API client measuring the two routes' latency while `running`."""

    def __init__(self, url: str, token: str, devices: Sequence[str]) -> None:
        import httpx

        self.client = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30
        )
        self.devices = sorted(devices)
        self.rng = random.Random(7)
        self.stop = threading.Event()
        self.latencies: dict[str, list[float]] = {"device_list": [], "telemetry_query": []}
        self.errors: list[str] = []
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.stop.clear()
        self.thread = threading.Thread(target=self._loop, name="bench-api", daemon=True)
        self.thread.start()

    def finish(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(30)

    def _loop(self) -> None:
        turn = 0
        while not self.stop.is_set():
            route = ("device_list", "telemetry_query")[turn % 2]
            turn += 1
            device = self.rng.choice(self.devices)
            if route == "device_list":
                params: dict[str, Any] = {"limit": 100}
                if self.rng.random() < 0.9:
                    params["cursor"] = device
                path = "/v1/devices"
            else:
                params = {
                    "metric": "rate_per_s",
                    "since": time.time() - API_SINCE_S,
                    "bucket_s": API_BUCKET_S,
                }
                path = f"/v1/devices/{device}/telemetry"
            started = time.perf_counter()
            response = self.client.get(path, params=params)
            elapsed = (time.perf_counter() - started) * 1000
            if response.status_code != 200:
                self.errors.append(f"{path}: {response.status_code} {response.text[:200]}")
            else:
                self.latencies[route].append(elapsed)
            self.stop.wait(API_PAUSE_S)

    def close(self) -> None:
        self.finish()
        self.client.close()


async def _pg_admin(statement: str, url: str = PG_ADMIN_URL) -> None:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=10)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@contextlib.contextmanager
def _database() -> Iterator[tuple[str, str]]:
    """A fresh database: (SQLAlchemy URL, asyncpg URL); dropped afterwards."""
    name = f"edged_bench_{uuid.uuid4().hex[:12]}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield base.replace("postgresql://", "postgresql+asyncpg://") + f"/{name}", f"{base}/{name}"
    finally:
        asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# -- the run ----------------------------------------------------------------------------------


def run() -> Result:
    from control_plane.local_broker import DynsecBootstrap, MosquittoBroker
    from tests.support.control_plane import ControlPlaneProcess

    started = time.perf_counter()
    admin_password = "bench-" + uuid.uuid4().hex
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edged-bench-ingest-")))
        sa_url, pg_url = stack.enter_context(_database())
        broker = stack.enter_context(
            MosquittoBroker(
                workdir=tmp / "broker",
                dynsec=DynsecBootstrap(BROKER_ADMIN, admin_password),
                max_queued_messages=10_000_000,
            )
        )

        started_processes: dict[str, Any] = {}

        def control_plane(name: str, **settings: str) -> Any:
            """The named control-plane process, started on first use (its port picked then:
            a thousand device connections later, an early pick may be taken)."""
            if name not in started_processes:
                settings = {**CP_SETTINGS, **settings}
                process = ControlPlaneProcess(
                    sa_url, broker, BROKER_ADMIN, admin_password, tmp / name, **settings
                )
                stack.callback(process.stop)
                process.start()
                started_processes[name] = process
            return started_processes[name]

        # "cp" does API and ingest alone, then is the split layout's first ingest replica.
        layouts = {
            "single": lambda: _Layout(api=control_plane("cp"), ingest=[control_plane("cp")]),
            "split": lambda: _Layout(
                api=control_plane("cp-api", ingest="false"),
                ingest=[
                    control_plane(f"cp-ingest-{i}" if i else "cp") for i in range(INGEST_REPLICAS)
                ],
                ingest_nice=INGEST_NICE,
            ),
        }
        workers: list[_Worker] = []
        stack.callback(_stop_workers, workers)
        measured = _measure(layouts, broker, pg_url, tmp, workers)
    measured["total_s"] = time.perf_counter() - started
    return _result(measured, broker_version=_broker_version(str(broker.binary)))


@dataclass
class _Layout:
    """Which control-plane processes answer the API and which consume the broker."""

    api: Any
    ingest: list[Any]
    ingest_nice: int = 0

    @property
    def pids(self) -> list[int]:
        return sorted({p.process.pid for p in (self.api, *self.ingest)})


def _renice(pid: int, nice: int) -> None:
    """Every thread of `pid` to `nice` (Linux keeps a niceness per thread; threads started
    later inherit their creator's), as systemd's Nice= does for a whole service."""
    import psutil

    for thread in psutil.Process(pid).threads():
        os.setpriority(os.PRIO_PROCESS, thread.id, nice)


def _stop_workers(workers: list[_Worker]) -> None:
    for worker in workers:
        with contextlib.suppress(OSError, ValueError):
            worker.conn.send(("stop",))
    deadline = time.monotonic() + 10
    for worker in workers:
        worker.process.join(max(0.1, deadline - time.monotonic()))
        if worker.process.is_alive():
            worker.process.terminate()
            worker.process.join(5)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join(5)
        worker.conn.close()


def _broker_version(binary: str) -> str:
    from bench.mqtt_baseline import _mosquitto_version

    return _mosquitto_version(binary)


def _start_workers(broker: Any, identities: Sequence[Any], workers: list[_Worker]) -> None:
    context = mp.get_context("spawn")
    share = math.ceil(len(identities) / PUBLISHERS)
    for index in range(PUBLISHERS):
        chunk = identities[index * share : (index + 1) * share]
        devices = [(i.default_device_id(), bytes(i.signing_key)) for i in chunk]
        ours, theirs = context.Pipe()
        plan = _Plan(index, broker.host, broker.port, devices)
        process = context.Process(target=_publisher, args=(plan, theirs), daemon=True)
        process.start()
        theirs.close()
        workers.append(_Worker(process, ours, [d for d, _ in devices]))


def _per_device(offered: float, seconds: float) -> int:
    """Messages each device needs for `seconds` at `offered` records/s (round-robin)."""
    per_worker = offered / RECORDS_PER_MESSAGE / PUBLISHERS * seconds
    return math.ceil(per_worker / math.ceil(DEVICES / PUBLISHERS)) + 1


def _measure(
    layouts: dict[str, Callable[[], _Layout]],
    broker: Any,
    pg_url: str,
    tmp: Path,
    workers: list[_Worker],
) -> dict[str, Any]:
    from edged.identity import DeviceIdentity

    identities = [DeviceIdentity.from_seed(os.urandom(32)) for _ in range(DEVICES)]
    _start_workers(broker, identities, workers)
    for worker in workers:
        _renice(worker.process.pid, PUBLISHERS_NICE)
    staircase = sum(_per_device(rate, STEP_S) for rate in STEPS)
    for worker in workers:  # the staircase's messages, encoded while the devices enrol
        worker.conn.send(("prepare", staircase))
    started = time.perf_counter()
    passwords = _enroll(layouts["single"]().api, identities, tmp / "devices")
    enroll_s = time.perf_counter() - started
    encode_s = max(w.expect("prepared", 600)[1] for w in workers)
    for worker in workers:
        worker.conn.send(("connect", {d: passwords[d] for d in worker.devices}))
    connect_s = max(w.expect("connected", 120)[1] for w in workers)
    measured: dict[str, Any] = {"enroll_s": enroll_s, "encode_s": encode_s, "connect_s": connect_s}
    for index, (name, make_layout) in enumerate(layouts.items()):
        if index:  # the first layout's staircase was encoded during enrolment
            for worker in workers:
                worker.conn.send(("prepare", staircase))
            measured["encode_s"] += max(w.expect("prepared", 600)[1] for w in workers)
        layout = make_layout()
        for process in layout.ingest:
            _renice(process.process.pid, layout.ingest_nice)
        # Every layout starts on an empty telemetry table (its size slows inserts down).
        asyncio.run(_pg_admin("TRUNCATE telemetry, ingest_rejections", pg_url))
        measured[name] = asyncio.run(_phases(layout, broker, pg_url, workers, sorted(passwords)))
    return measured


def _enroll(cp: Any, identities: Sequence[Any], root: Path) -> dict[str, str]:
    """Every device through the real flow: a one-time token, then POST /v1/enroll."""
    from edged.enrollment import enroll

    def one(index: int) -> tuple[str, str]:
        state_dir = root / str(index)
        enrollment = enroll(cp.url, cp.enrollment_token(GROUP), identities[index], state_dir)
        return enrollment.device_id, (state_dir / "uplink.password").read_text()

    with ThreadPoolExecutor(ENROLL_THREADS) as pool:
        passwords = dict(pool.map(one, range(len(identities))))
    if set(passwords) != {i.default_device_id() for i in identities}:
        raise RuntimeError("enrolled device ids differ from the keys' default ids")
    return passwords


class _Load:
    """The publishers, driven together: prepare, run, collect; the ingest replicas' counters
    since `begin`."""

    def __init__(self, workers: list[_Worker], metrics: Sequence[Any]) -> None:
        self.workers, self.metrics = workers, metrics
        self.published = 0  # records PUBACKed by the broker, every phase so far
        self.base = ""

    async def begin(self) -> None:
        self.base = await self.metrics_text()

    async def metrics_text(self) -> str:
        """Every ingest replica's /metrics, one after another (`_metric` sums them)."""
        return "\n".join([(await client.get("/metrics")).text for client in self.metrics])

    def counter(self, text: str, name: str, labels: str = "") -> float:
        return _metric(text, name, labels) - _metric(self.base, name, labels)

    async def prepare(self, offered: float, seconds: float) -> float:
        for worker in self.workers:
            worker.conn.send(("prepare", _per_device(offered, seconds)))
        done = [await asyncio.to_thread(w.expect, "prepared", 600) for w in self.workers]
        return max(d[1] for d in done)

    def start(self, offered: float, seconds: float) -> None:
        rate = offered / RECORDS_PER_MESSAGE / len(self.workers)
        for worker in self.workers:
            worker.conn.send(("run", rate, seconds))

    async def finish(self, seconds: float) -> tuple[int, float]:
        """(records sent, worst lateness in s) once every PUBACK is in."""
        ran = [await asyncio.to_thread(w.expect, "ran", seconds + 60) for w in self.workers]
        sent = sum(r[1] for r in ran)
        if sum(r[3] for r in ran) or sum(r[2] for r in ran) != sent:
            raise RuntimeError(f"publishers (sent, acked, refused): {[r[1:4] for r in ran]}")
        self.published += sent * RECORDS_PER_MESSAGE
        return sent * RECORDS_PER_MESSAGE, max(r[5] for r in ran)

    async def stored(self) -> float:
        return self.counter(await self.metrics_text(), "edged_cp_ingest_records_total")

    async def drain(self) -> float:
        """Seconds until ingest has stored every record published so far."""
        started = time.perf_counter()
        while (stored := await self.stored()) < self.published:
            if time.perf_counter() - started > DRAIN_TIMEOUT_S:
                raise RuntimeError(
                    f"ingest stored {stored:.0f} of {self.published} records "
                    f"{DRAIN_TIMEOUT_S:g} s after publishing stopped"
                )
            await asyncio.sleep(0.25)
        return time.perf_counter() - started


async def _phases(
    layout: _Layout, broker: Any, pg_url: str, workers: list[_Worker], ids: Sequence[str]
) -> dict[str, Any]:
    import asyncpg
    import httpx

    conn = await asyncpg.connect(pg_url)
    api = _Api(layout.api.url, layout.api.admin_token, ids)
    meter = _CpuMeter(layout.pids, broker.pid, [w.process.pid for w in workers])
    metrics_clients = [httpx.AsyncClient(base_url=p.url, timeout=30) for p in layout.ingest]
    load = _Load(workers, metrics_clients)
    rounds = _Rounds()
    pool = await asyncio.to_thread(_ceiling_pool)
    try:
        await load.begin()
        api.start()  # idle: no device publishing yet
        await asyncio.sleep(IDLE_API_S)
        api.finish()
        rounds.idle_latencies, api.latencies = api.latencies, {k: [] for k in api.latencies}
        rounds.staircase = await _staircase(load)
        rounds.staircase_drain_s = await load.drain()
        capacity = max(rate for _offered, rate in rounds.staircase)
        offered = min(MAX_OFFERED, CATCHUP_MARGIN * capacity)
        for index in range(ROUNDS):
            window = await _ingest_round(conn, api, meter, load, offered)
            rounds.windows.append(window)
            offered = min(MAX_OFFERED, CATCHUP_MARGIN * window.records_per_s)
            batch = max(1, round(window.records_per_batch))
            rounds.ceiling_batch.append(batch)
            rounds.ceiling.append(await _ceiling(conn, pool, index, batch))
            rounds.ceiling_copy.append(await _ceiling_copy(conn, pool, index, batch))
        rounds.latencies, rounds.api_errors = api.latencies, api.errors
        text = await load.metrics_text()
        stored = await conn.fetchval("SELECT count(*) FROM telemetry WHERE device_id LIKE 'dev-%'")
        rejected_rows = await conn.fetchval("SELECT coalesce(sum(count), 0) FROM ingest_rejections")
        dead = await conn.fetchval(
            "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'devices'"
        )
        size = await conn.fetchval("SELECT pg_total_relation_size('telemetry')")
    finally:
        api.close()
        for client in metrics_clients:
            await client.aclose()
        await conn.close()
    return {
        "rounds": rounds,
        "published": load.published,
        "stored": int(stored),
        "rejected_rows": int(rejected_rows),
        "rejected_metric": load.counter(text, "edged_cp_ingest_rejected_total"),
        "refused_messages": load.counter(
            text, "edged_cp_ingest_messages_total", 'outcome="refused"'
        ),
        "duplicates": load.counter(text, "edged_cp_ingest_duplicates_total"),
        "devices_dead_tuples": dead,
        "telemetry_mb": size / (1 << 20),
    }


async def _staircase(load: _Load) -> list[tuple[float, float]]:
    """Offer STEPS records/s in turn, STEP_S each, until ingest falls behind: the steps'
    (offered, stored records/s over all but the first second), the last one saturated."""
    steps = []
    for offered in STEPS:
        load.start(offered, STEP_S)
        await asyncio.sleep(1.0)
        before, t0 = await load.stored(), time.perf_counter()
        await asyncio.sleep(STEP_S - 1.0)
        rate = (await load.stored() - before) / (time.perf_counter() - t0)
        await load.finish(STEP_S)
        steps.append((offered, rate))
        if rate < 0.85 * offered:
            break
    return steps


async def _ingest_round(
    conn: Any, api: _Api, meter: _CpuMeter, load: _Load, offered: float
) -> _Window:
    duration = WARMUP_S + WINDOW_S + TAIL_S
    encode_s = await load.prepare(offered, duration)
    load.start(offered, duration)
    await asyncio.sleep(WARMUP_S)
    before_text = await load.metrics_text()
    cpu0, t0 = meter.read(), time.perf_counter()
    count0 = await conn.fetchval("SELECT count(*) FROM telemetry")
    count_s = time.perf_counter() - t0
    api.start()
    await asyncio.sleep(WINDOW_S - (time.perf_counter() - t0))
    await asyncio.to_thread(api.finish)  # its last request, then the window closes
    t1 = time.perf_counter()
    count1 = await conn.fetchval("SELECT count(*) FROM telemetry")
    count_s = max(count_s, time.perf_counter() - t1)
    cpu1, wall = meter.read(), time.perf_counter() - t0
    after_text = await load.metrics_text()
    sent, late = await load.finish(duration)
    drain_s = await load.drain()

    def delta(name: str) -> float:
        return _metric(after_text, name) - _metric(before_text, name)

    batches = delta("edged_cp_ingest_batch_seconds_count")
    rate = (count1 - count0) / (t1 - t0)
    return _Window(
        offered=offered,
        records_per_s=rate,
        saturated=rate < 0.95 * offered,
        published_records=sent,
        cpu={k: (cpu1[k] - cpu0[k]) / wall for k in cpu0},
        records_per_batch=delta("edged_cp_ingest_records_total") / batches if batches else 0.0,
        batch_ms=delta("edged_cp_ingest_batch_seconds_sum") * 1000 / batches if batches else 0.0,
        drain_s=drain_s,
        pacing_late_s=late,
        count_query_s=count_s,
        encode_s=encode_s,
    )


def _ceiling_pool() -> list[tuple[Any, ...]]:
    """Rows exactly as the ingest plans them (its own planner), bodies serialised as SQLAlchemy
    would send them; keys are replaced per round."""
    from nacl.signing import SigningKey

    from control_plane.ingest_plan import DeviceInfo, Message, plan_ingest
    from edged_formats.wire import WireLimits

    key = SigningKey(b"\x07" * 32)
    device = "dev-" + "c" * 16
    pool = _body_pool(99)
    signer = _Signer(device, key, pool, random.Random(5))
    payloads = [signer.message() for _ in range(100)]
    info = DeviceInfo(key.verify_key, "active")
    plan = plan_ingest(
        [Message(f"edged/v1/{device}/telemetry", p) for p in payloads],
        lambda _d: info,
        time.time(),
        WireLimits(),
    )
    return [
        tuple(
            (row.get("body_json") or json.dumps(row["body"])) if c == "body" else row[c]
            for c in _TELEMETRY_COLUMNS
        )
        for row in plan.telemetry
    ]


def _insert_sql(rows: int) -> str:
    width = len(_TELEMETRY_COLUMNS)
    values = ", ".join(
        "(" + ", ".join(f"${r * width + c + 1}" for c in range(width)) + ")" for r in range(rows)
    )
    return (
        f"INSERT INTO telemetry ({', '.join(_TELEMETRY_COLUMNS)}) VALUES {values} "
        "ON CONFLICT (device_id, boot, seq) DO NOTHING RETURNING seq"
    )


def _ceiling_rows(pool: Sequence[tuple[Any, ...]], tag: str) -> list[tuple[Any, ...]]:
    """CEILING_ROWS fresh rows over DEVICES ceiling-only device ids."""
    return [
        (f"ceil-{tag}-{n % DEVICES:04d}", 1, n, *pool[n % len(pool)][3:])
        for n in range(CEILING_ROWS)
    ]


async def _ceiling(conn: Any, pool: Sequence[tuple[Any, ...]], index: int, batch: int) -> float:
    """Records/s of batched multi-row inserts of CEILING_ROWS fresh rows, `batch` rows per
    transaction in statements of at most PAGE_ROWS rows."""
    rows = _ceiling_rows(pool, f"{index}v")
    batches = []
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        pages = []
        for page_start in range(0, len(chunk), PAGE_ROWS):
            page = chunk[page_start : page_start + PAGE_ROWS]
            pages.append((_insert_sql(len(page)), [v for row in page for v in row]))
        batches.append(pages)
    started = time.perf_counter()
    stored = 0
    for pages in batches:
        async with conn.transaction():
            for sql, args in pages:
                stored += len(await conn.fetch(sql, *args))
    elapsed = time.perf_counter() - started
    if stored != CEILING_ROWS:
        raise RuntimeError(f"ceiling stored {stored} of {CEILING_ROWS} rows")
    return CEILING_ROWS / elapsed


async def _ceiling_copy(
    conn: Any, pool: Sequence[tuple[Any, ...]], index: int, batch: int
) -> float:
    """The same through binary COPY into a temporary staging table, then one INSERT ...
    SELECT ... ON CONFLICT DO NOTHING RETURNING seq per transaction."""
    rows = _ceiling_rows(pool, f"{index}c")
    await conn.execute(
        "CREATE TEMP TABLE IF NOT EXISTS ceiling_stage (LIKE telemetry) ON COMMIT DELETE ROWS"
    )
    listed = ", ".join(_TELEMETRY_COLUMNS)
    insert = (
        f"INSERT INTO telemetry ({listed}) SELECT {listed} FROM ceiling_stage "
        "ON CONFLICT (device_id, boot, seq) DO NOTHING RETURNING seq"
    )
    started = time.perf_counter()
    stored = 0
    for start in range(0, len(rows), batch):
        async with conn.transaction():
            await conn.copy_records_to_table(
                "ceiling_stage", records=rows[start : start + batch], columns=_TELEMETRY_COLUMNS
            )
            stored += len(await conn.fetch(insert))
    elapsed = time.perf_counter() - started
    if stored != CEILING_ROWS:
        raise RuntimeError(f"COPY ceiling stored {stored} of {CEILING_ROWS} rows")
    return CEILING_ROWS / elapsed


# -- the result -------------------------------------------------------------------------------


def _layout_metrics(measured: dict[str, Any]) -> dict[str, Any]:
    rounds: _Rounds = measured["rounds"]
    windows = rounds.windows
    ingest = median([w.records_per_s for w in windows])
    ceiling = median(rounds.ceiling)
    lat = rounds.latencies
    p99 = {k: percentile(v, 99) for k, v in lat.items()}
    p50 = {k: percentile(v, 50) for k, v in lat.items()}
    cpu = {k: round(median([w.cpu[k] for w in windows]), 3) for k in windows[0].cpu}
    rejected = measured["rejected_rows"] + measured["rejected_metric"]
    metrics: dict[str, Any] = {
        "records_per_s": round(ingest, 1),
        "ceiling_records_per_s": round(ceiling, 1),
        "p99_ms": round(max(p99.values()), 1),
        "p99_ms_device_list": round(p99["device_list"], 1),
        "p99_ms_telemetry_query": round(p99["telemetry_query"], 1),
        "p50_ms_device_list": round(p50["device_list"], 1),
        "p50_ms_telemetry_query": round(p50["telemetry_query"], 1),
        "max_ms": round(max(max(v) for v in lat.values()), 1),
        "idle_p99_ms": {k: round(percentile(v, 99), 1) for k, v in rounds.idle_latencies.items()},
        "idle_p50_ms": {k: round(percentile(v, 50), 1) for k, v in rounds.idle_latencies.items()},
        "api_requests": {k: len(v) for k, v in lat.items()},
        "api_errors": len(rounds.api_errors),
        "messages_per_s": round(ingest / RECORDS_PER_MESSAGE, 1),
        "devices": DEVICES,
        "records_per_message": RECORDS_PER_MESSAGE,
        "publisher_processes": PUBLISHERS,
        "staircase_offered_vs_stored": [[round(o), round(r, 1)] for o, r in rounds.staircase],
        "rounds_offered_records_per_s": [round(w.offered, 1) for w in windows],
        "rounds_records_per_s": [round(w.records_per_s, 1) for w in windows],
        "rounds_saturated": [w.saturated for w in windows],
        "rounds_ceiling_records_per_s": [round(v, 1) for v in rounds.ceiling],
        "ceiling_copy_records_per_s": round(median(rounds.ceiling_copy), 1),
        "rounds_ceiling_copy_records_per_s": [round(v, 1) for v in rounds.ceiling_copy],
        "ceiling_records_per_transaction": rounds.ceiling_batch,
        "ingest_records_per_transaction": [round(w.records_per_batch, 1) for w in windows],
        "ingest_transaction_ms": [round(w.batch_ms, 1) for w in windows],
        "cpu_cores": cpu,
        "control_plane_cpu_us_per_record": round(cpu["control_plane"] * 1e6 / ingest, 1),
        "postgresql_cpu_us_per_record": round(cpu["postgresql"] * 1e6 / ingest, 1),
        "published_records": measured["published"],
        "stored_records": measured["stored"],
        "lost": measured["published"] - measured["stored"],
        "rejected": int(rejected),
        "refused_messages": int(measured["refused_messages"]),
        "duplicates": int(measured["duplicates"]),
        "devices_dead_tuples_at_end": measured["devices_dead_tuples"],
        "telemetry_table_mb": round(measured["telemetry_mb"], 1),
        "count_query_ms_max": round(max(w.count_query_s for w in windows) * 1000, 1),
        "pacing_late_s_max": round(max(w.pacing_late_s for w in windows), 3),
        "drain_s": [round(rounds.staircase_drain_s, 1)] + [round(w.drain_s, 1) for w in windows],
        "encode_s": round(sum(w.encode_s for w in windows), 1),
    }
    if rounds.api_errors:
        metrics["api_error_samples"] = rounds.api_errors[:3]
    return metrics


def _result(measured: dict[str, Any], broker_version: str) -> Result:
    split, single = _layout_metrics(measured["split"]), _layout_metrics(measured["single"])
    metrics: dict[str, Any] = {
        **split,
        # what every layout must hold
        "lost": split["lost"] + single["lost"],
        "rejected": split["rejected"] + single["rejected"],
        "single_process": single,
        "enroll_s": round(measured["enroll_s"], 1),
        "enroll_per_s": round(DEVICES / measured["enroll_s"], 2),
        "encode_s": round(measured["encode_s"] + split["encode_s"] + single["encode_s"], 1),
        "connect_s": round(measured["connect_s"], 1),
        "total_s": round(measured["total_s"], 1),
    }
    return Result(
        name="ingest",
        value=split["records_per_s"],
        unit="records/s",
        baseline=split["ceiling_records_per_s"],
        baseline_is=(
            "the same PostgreSQL database and telemetry table, asyncpg multi-row INSERT ... ON "
            f"CONFLICT DO NOTHING RETURNING seq in {PAGE_ROWS}-row statements, one transaction "
            "per ingest-sized batch (the round's mean records per ingest transaction), rows "
            "from the ingest's own planner with bodies already serialised; no MQTT, no "
            "decoding, no device updates; one ceiling after each ingest round"
        ),
        target="records_per_s >= 20000",
        metrics=metrics,
        targets=TARGETS,
        conditions=conditions(
            devices=(
                f"{DEVICES} enrolled through the API (one-time token, edged.enrollment.enroll, "
                f"{ENROLL_THREADS} at a time), each with its own dynsec account and password"
            ),
            publishers=(
                f"{PUBLISHERS} processes x {math.ceil(DEVICES / PUBLISHERS)} paho-mqtt MQTT 5 "
                "clients (one socket per device, its own credentials and client id), one "
                "selector loop per process, QoS 1, paced open loop, round-robin over devices, "
                f"at nice {PUBLISHERS_NICE} (devices are not on the control plane's machine)"
            ),
            messages=(
                f"signed wire batches of {RECORDS_PER_MESSAGE} telemetry records "
                f"({_message_bytes()} bytes), pre-encoded before each phase; bodies shaped "
                f"like the daemon's status() + health, drawn from {BODY_POOL} snapshots per "
                "process with the device's id; distinct (boot, seq) per device"
            ),
            offered=(
                f"calibration staircase {[round(s) for s in STEPS]} records/s, {STEP_S:g} s "
                f"each, up to the first step ingest fell behind on; round 1 offers "
                f"{CATCHUP_MARGIN} x the best stored rate, each later round {CATCHUP_MARGIN} "
                "x the previous round's committed rate (so ingest is saturated, its backlog "
                "bounded); value is the median of the rounds"
            ),
            window=(
                f"{ROUNDS} rounds: {WARMUP_S:g} s warm-up, {WINDOW_S:g} s window timed by "
                "SELECT count(*) FROM telemetry at both ends, then drain; a ceiling after each"
            ),
            ceiling_rows_per_round=CEILING_ROWS,
            api_load=(
                f"one client, one request at a time with a {API_PAUSE_S * 1000:g} ms pause, "
                "alternating GET /v1/devices?limit=100 (random cursor) and GET "
                "/v1/devices/{id}/telemetry?metric=rate_per_s&since=now-"
                f"{API_SINCE_S:g}&bucket_s={API_BUCKET_S:g} (random device), admin token, "
                f"during the windows (and for {IDLE_API_S:g} s before any device publishes: "
                "idle_p50_ms, idle_p99_ms)"
            ),
            control_plane=(
                f"split (the value): {INGEST_REPLICAS} `edged-control-plane serve` ingest "
                "replicas in one shared-subscription group plus one API-only replica "
                f"(ingest = false) that the API client talks to, the ingest replicas at nice "
                f"{INGEST_NICE} (systemd Nice=), the API at 0; single_process: one serve "
                "process doing both. Ingest batch 2000, linger 0.05 s, device cache 5 s (the "
                "production defaults); each layout starts on an empty telemetry table"
            ),
            broker=(
                f"{broker_version}, dynamic security, loopback, otherwise the tests' "
                "configuration, max_queued_messages 1e7 (a backlog is never dropped)"
            ),
            postgresql=_pg_version(),
            machine=(
                "control plane, broker, PostgreSQL, publishers and the API client share "
                "this machine's cores"
            ),
            paho_mqtt=metadata.version("paho-mqtt"),
            sqlalchemy=metadata.version("sqlalchemy"),
            asyncpg=metadata.version("asyncpg"),
        ),
    )


def _message_bytes() -> int:
    from nacl.signing import SigningKey

    signer = _Signer("dev-" + "a" * 16, SigningKey(b"\x01" * 32), _body_pool(0), random.Random(0))
    return len(signer.message())


def _pg_version() -> str:
    async def version() -> str:
        import asyncpg

        conn = await asyncpg.connect(PG_ADMIN_URL, timeout=10)
        try:
            text: str = await conn.fetchval("SHOW server_version")
            buffers: str = await conn.fetchval("SHOW shared_buffers")
            sync: str = await conn.fetchval("SHOW synchronous_commit")
        finally:
            await conn.close()
        return f"PostgreSQL {text}, shared_buffers {buffers}, synchronous_commit {sync}"

    return asyncio.run(version())
