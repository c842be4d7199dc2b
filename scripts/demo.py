"""`make demo`: everything edged can do so far, end to end, on real parts.

1. The cloud toolchain trains the reference models (a CNN on scikit-learn's digits, a 1-D CNN
   on real smartwatch IMU recordings), converts them with litert-torch, int8-quantises them
   with ai-edge-quantizer and packs bundles.
2. Separate device processes (no torch) inspect each bundle and stream its held-out data
   through the LiteRT engine one sample at a time: accuracy, latency, confidence histogram.
3. The daemon: `edged run` as a real child process (systemd's notify socket bound by the demo)
   on a live digits stream, clean and then rotated by 30°, with a device-local Mosquitto for
   results and a cloud Mosquitto for the uplink. A live line every 0.5 s from `edged status`'s
   socket and the results topic: gating, upload budget, drift scores. The cloud broker is
   stopped mid-stream and started again (the SQLite outbox holds what is kept); a receiver
   checks every message's ed25519 signature and de-duplicates records by (device, boot, seq),
   as the cloud's ingest will, and reports when each drift event arrives. SIGTERM: a drained
   exit 0, and every sample the daemon's final telemetry says it uploaded is in the cloud.
4. The fleet (scripts/demo_fleet.py): the control plane on embedded defaults, three daemons
   enrolled through the real flow, their telemetry, health and drift read back through the
   REST API; a viewer refused and audited, a device quarantined, one decommissioned.
5. Signed updates (scripts/demo_ota.py): offline root keys, the registry and its signed
   repository, a head-only fine-tune rolled out stage by stage over MQTT notifications, delta
   patches, A/B slots and health trials; one site's trial fails, it rolls back, the rollout
   pauses.
6. On-device fine-tuning (scripts/demo_finetune.py): a tilted camera's uncertain samples are
   labelled through the REST API, the labels reach the device over MQTT, its fine-tune worker
   trains the last block and the head, the candidate passes the gate and the health trial,
   and the accuracy on held-out tilted digits recovers; switched off by the operator, the
   cloud's model returns.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from demo_finetune import finetune_act
from demo_fleet import fleet_act, read_status
from demo_ota import ota_act
from demo_ship import ship_act
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from control_plane.local_broker import MosquittoBroker
from control_plane.toolchain.datasets import rotated
from edged.identity import DeviceIdentity
from edged_formats import WireError, decode_batch

BIN = Path(sys.executable).parent


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def run(*args: str, capture: bool = False) -> str:
    """Run one real command; the toolchain's own log chatter is shown only if it fails."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        args,
        check=False,
        text=True,
        env=env,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.PIPE,
    )
    if result.returncode != 0:
        sys.stderr.write(result.stderr)
        raise SystemExit(f"demo step failed: {' '.join(args)}")
    return result.stdout or ""


def build(name: str, out: Path) -> Path:
    step(f"cloud: edged-model build {name} (torch -> litert-torch -> ai-edge-quantizer int8)")
    report = json.loads(
        run(str(BIN / "edged-model"), "build", name, "--out", str(out), capture=True)
    )
    print(
        f"  held-out: torch {report['torch_accuracy']:.2%}, int8 {report['int8_accuracy']:.2%}, "
        f"top-1 agreement {report['top1_agreement']:.2%}"
    )
    print(
        f"  size: float {report['float_bytes']} B -> int8 {report['int8_bytes']} B "
        f"({report['size_ratio']:.0%})"
    )
    return out / report["bundle"]


def serve(bundle: Path, data: Path) -> None:
    step(f"device: edged model inspect {bundle.name}")
    info = json.loads(run(str(BIN / "edged"), "model", "inspect", str(bundle), capture=True))
    print(f"  {info['name']} {info['version']}, {info['bytes']} B, {info['model']['runtime']}")
    spec = info["input"]
    print(
        f"  input {spec['shape']} {spec['dtype']} {spec['layout']}, "
        f"raw*{spec['scale']:.4g}{spec['offset']:+.4g}; output {info['output']['kind']} over "
        f"{len(info['labels'])} labels; embedding {info['embedding']['size']}"
    )
    print(f"  ops {', '.join(f'{k}x{v}' for k, v in info['model']['ops'].items())}")
    step(f"device: edged replay {bundle.name} {data.name} (one sample at a time)")
    run(str(BIN / "edged"), "replay", str(bundle), str(data))


# -- act 3: the daemon -----------------------------------------------------------------------

RATE_HZ = 150  # samples/s from the replay source: watchable, and about 10 s for the stream
SAMPLES_PER_HOUR = 60  # the upload budget for uncertain samples; the drift burst exceeds it
OUTAGE = (200, 450)  # the cloud broker is stopped at about this sample, started at about that
WINDOW = 150  # the "uncertain" column: share of the last WINDOW results
RESULTS_TOPIC = "edged/local/results"


def drifted_stream(test_npz: Path, path: Path) -> int:
    """The held-out digits twice as they are, then the same twice rotated by 30° (bilinear,
    rounded and clipped to 0..16 as in docs/drift.md). Returns the first rotated sample's index."""
    x = np.load(test_npz)["x"]
    turned = rotated(x, 30)
    np.savez(path, x=np.concatenate([x, x, turned, turned]))
    return 2 * len(x)


def write_config(
    path: Path,
    bundle: Path,
    stream: Path,
    state: Path,
    status: Path,
    *,
    local: MosquittoBroker,
    cloud: MosquittoBroker,
) -> None:
    """The daemon's edged.toml, as an operator would write it."""
    path.write_text(
        f"""\
[device]
state_dir = {json.dumps(str(state))}
model = {json.dumps(str(bundle))}

[[source]]
kind = "replay"
name = "digits"
path = {json.dumps(str(stream))}
rate_hz = {RATE_HZ}

[local_mqtt]  # the device's own broker: results for local consumers
host = "{local.host}"
port = {local.port}
results_topic = "{RESULTS_TOPIC}"

[uplink]  # the cloud broker
host = "{cloud.host}"
port = {cloud.port}

[gating.budget]
samples_per_hour = {SAMPLES_PER_HOUR}

[outbox]
min_free_mb = 0

[telemetry]
interval_s = 3

[status]
socket = {json.dumps(str(status))}
"""
    )


class Receiver:
    """The cloud end: subscribes to every device topic on the cloud broker, checks each
    message's ed25519 signature against the device's public key, and keeps each record once by
    (device, boot, seq), as the cloud's ingest will. Its session outlives a broker restart."""

    def __init__(self, host: str, port: int, key_file: Path) -> None:
        identity = DeviceIdentity.load_or_create(key_file)  # the key enrollment registers
        self.device, self.verify_key = identity.default_device_id(), identity.verify_key
        self.records: dict[tuple[str, int, int], tuple[str, Any]] = {}
        self.events: list[tuple[float, dict[str, Any]]] = []  # (arrival, body), first arrivals
        self.messages = self.duplicates = self.rejected = 0
        self.states: list[bool] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="demo-cloud", protocol=mqtt.MQTTv5
        )
        self.client.on_connect = lambda c, *_: c.subscribe("edged/v1/+/#", qos=1)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(min_delay=1, max_delay=1)
        # A persistent session, so the broker queues what arrives while we are away, even
        # across its own restart: records nobody subscribes to are acknowledged to the device
        # ("no matching subscribers") and dropped. Mosquitto 2.0 restores a session after a
        # restart only if it was never started clean, hence clean_start=False from the start
        # (the broker's directory is new each run).
        session = Properties(PacketTypes.CONNECT)
        session.SessionExpiryInterval = 3600
        self.client.connect(host, port, clean_start=False, properties=session)
        self.client.loop_start()
        if not self.subscribed.wait(10):
            raise SystemExit("demo step failed: the cloud receiver could not subscribe")

    def _on_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        try:
            batch = decode_batch(
                message.topic,
                message.payload,
                lambda d: self.verify_key if d == self.device else None,
            )
        except WireError:
            with self.lock:
                self.rejected += 1
            return
        with self.lock:
            self.messages += 1
            if batch.channel == "state":
                self.states.append(bool(batch.records[0].body.get("online")))
                return
            for record in batch.records:
                key = (batch.device, record.boot, record.seq)
                if key in self.records:
                    self.duplicates += 1
                    continue
                self.records[key] = (batch.channel, record.body)
                if batch.channel == "events":
                    self.events.append((time.monotonic(), record.body))

    def bodies(self, channel: str) -> list[Any]:
        with self.lock:
            return [b for (_, _, _), (c, b) in sorted(self.records.items()) if c == channel]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Results:
    """A local consumer of the daemon's results topic on the device's own broker."""

    def __init__(self, host: str, port: int) -> None:
        self.verdicts: dict[int, str] = {}
        self.recent: collections.deque[str] = collections.deque(maxlen=WINDOW)
        self.received = 0
        self.last = -1
        self.subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="demo-local", protocol=mqtt.MQTTv5
        )
        self.client.on_connect = lambda c, *_: c.subscribe(RESULTS_TOPIC, qos=0)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.loop_start()
        if not self.subscribed.wait(10):
            raise SystemExit("demo step failed: the local consumer could not subscribe")

    def _on_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        result = json.loads(message.payload)
        ref = int(result["ref"])
        self.verdicts[ref] = result["verdict"]
        self.recent.append(result["verdict"])
        self.received += 1
        self.last = max(self.last, ref)

    def uncertain_share(self) -> float:
        recent = list(self.recent)
        return sum(v == "uncertain" for v in recent) / len(recent) if recent else 0.0

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class NotifySocket:
    """systemd's end of sd_notify: the datagram socket NOTIFY_SOCKET names."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.last = ""

    def lines(self) -> list[str]:
        """The datagrams received since the last call, each as its KEY=value lines (but
        STATUS=) joined by spaces."""
        datagrams = []
        while True:
            try:
                text = self.sock.recv(4096).decode()
            except BlockingIOError:
                return datagrams
            datagrams.append(" ".join(text.splitlines()))

    def close(self) -> None:
        self.sock.close()


def expect(condition: bool, failure: str, log: Path) -> None:
    if not condition:
        sys.stderr.write(log.read_text(errors="replace")[-4000:])
        raise SystemExit(f"demo step failed: {failure}")


HEADER = (
    "     t  sample  rate/s  uncertain  uploaded  suppressed  outbox  uplink        "
    "  shift    psi  cusum"
)


def row(elapsed: float, sample: int, results: Results, status: dict[str, Any]) -> str:
    gating, drift = status["gating"], status["drift"]
    suppressed = sum(v for k, v in gating.items() if k.startswith("suppressed_"))
    uplink = (status["uplink"] or {}).get("state", "off")

    def score(kind: str, fmt: str) -> str:
        return f"{drift[kind]:{fmt}}" + ("!" if drift[f"{kind}_alarm"] else " ")

    return (
        f"  {elapsed:4.1f}s  {sample:6d}  {status['rate_per_s']:6.1f}  "
        f"{results.uncertain_share():8.0%}  {gating['uploaded']:8d}  {suppressed:10d}  "
        f"{status['outbox']['depth']:6d}  {uplink[:12]:12s}  "
        f"{score('feature_shift', '5.2f')} {score('confidence_psi', '5.2f')} "
        f"{score('confidence_cusum', '5.1f')}"
    )


def daemon_act(bundle: Path, test_npz: Path, out: Path) -> None:
    step("device: `edged run` on a live digits stream, a 30° rotation injected, a cloud outage")
    work = out / "daemon"
    shutil.rmtree(work, ignore_errors=True)  # a fresh device: a replay resumes where it was
    work.mkdir(parents=True)
    stream, state, config, log = (work / n for n in ("stream.npz", "state", "edged.toml", "log"))
    drift_at = drifted_stream(test_npz, stream)
    total = 2 * drift_at
    print(
        f"  stream: the {drift_at // 2} held-out digits twice, then the same rotated 30° twice "
        f"({total} samples at {RATE_HZ}/s); the drift starts at sample {drift_at}"
    )
    print(
        f"  live: uncertain = share of the last {WINDOW} results on the local broker; "
        f"uploaded/suppressed by the upload budget ({SAMPLES_PER_HOUR} samples/h); drift scores "
        "(! = alarm active)"
    )
    sockets = Path(tempfile.mkdtemp(prefix="edged-demo-"))  # unix socket paths: ≤ 107 bytes
    try:
        with (
            MosquittoBroker(workdir=work / "local-broker") as local,
            MosquittoBroker(workdir=work / "cloud-broker", persistence=True) as cloud,
            open(log, "wb") as log_file,
        ):
            status_path = sockets / "status.sock"
            write_config(config, bundle, stream, state, status_path, local=local, cloud=cloud)
            print(f"  $ edged check-config {config}")
            print("  " + run(str(BIN / "edged"), "check-config", str(config), capture=True).strip())
            receiver = Receiver(cloud.host, cloud.port, state / "device.key")
            results = Results(local.host, local.port)
            notify = NotifySocket(sockets / "notify.sock")
            env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "NOTIFY_SOCKET": str(notify.path)}
            print(f"  $ edged run --config {config}   (NOTIFY_SOCKET bound here, as systemd does)")
            started = time.monotonic()
            daemon = subprocess.Popen(
                [str(BIN / "edged"), "run", "--config", str(config)],
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
            try:
                peak = watch(
                    daemon, results, receiver, notify, cloud, status_path, drift_at, log, started
                )
                print(f"  $ edged status --config {config}")
                shown = run(str(BIN / "edged"), "status", "--config", str(config), capture=True)
                print("\n".join("    " + line for line in shown.splitlines()))
                finish(daemon, results, receiver, notify, drift_at, log, peak)
            finally:
                if daemon.poll() is None:
                    daemon.kill()
                    daemon.wait()
                receiver.close()
                results.close()
                notify.close()
    finally:
        shutil.rmtree(sockets, ignore_errors=True)


def show_notifications(notify: NotifySocket) -> None:
    """Each datagram on one line; the ticker's first STATUS= repeats READY's, shown once."""
    for datagram in notify.lines():
        if datagram != notify.last:
            print(f"  systemd <- {datagram}")
        notify.last = datagram


def watch(
    daemon: subprocess.Popen[bytes],
    results: Results,
    receiver: Receiver,
    notify: NotifySocket,
    cloud: MosquittoBroker,
    status_path: Path,
    drift_at: int,
    log: Path,
    started: float,
) -> int:
    """A live line every 0.5 s from the status socket and the results topic; the outage and
    the drift as they happen. Returns the outbox's peak depth."""
    outage, injected, shown, peak = "ahead", False, 0, 0
    next_row: float | None = None
    while True:
        expect(daemon.poll() is None, f"edged run exited ({daemon.returncode})", log)
        expect(time.monotonic() - started < 60, "the stream did not finish within 60 s", log)
        show_notifications(notify)
        sample = results.last
        if outage == "ahead" and sample >= OUTAGE[0]:
            cloud.stop()
            print(f"  >> cloud broker stopped at sample {sample}; the device keeps going")
            outage = "down"
        elif outage == "down" and sample >= OUTAGE[1]:
            cloud.start()
            print(f"  >> cloud broker started again at sample {sample}")
            outage = "over"
        if not injected and sample >= drift_at:
            print(f"  >> drift injected: sample {drift_at} is the first digit rotated by 30°")
            injected = True
        with receiver.lock:
            arrived = receiver.events[shown:]
        shown += len(arrived)
        for _, event in arrived:
            if event.get("name") == "drift":
                print(
                    f"  >> cloud got a drift event (events channel, signature verified): "
                    f"{event['kind']} {event['score']:.2f} ≥ {event['threshold']} at sample "
                    f"{event['samples']}, {event['samples'] - drift_at} samples into the drift"
                )
        now = time.monotonic()
        if next_row is None and results.received:
            print(HEADER)
            next_row = now + 0.5
        if next_row is not None and now >= next_row:
            next_row += 0.5
            status = read_status(status_path)
            if status is not None:
                peak = max(peak, status["outbox"]["depth"])
                print(row(now - started, sample, results, status))
                if (
                    status["counts"]["inferred"] >= 2 * drift_at
                    and status["outbox"]["depth"] == 0
                    and outage == "over"
                ):
                    return peak
        time.sleep(0.05)


def finish(
    daemon: subprocess.Popen[bytes],
    results: Results,
    receiver: Receiver,
    notify: NotifySocket,
    drift_at: int,
    log: Path,
    peak: int,
) -> None:
    """SIGTERM, a clean exit, and what reached the cloud against what the daemon says."""
    print(f"  $ kill -TERM {daemon.pid}")
    stop = time.monotonic()
    daemon.send_signal(signal.SIGTERM)
    code = daemon.wait(30)
    show_notifications(notify)
    print(f"  edged exited {code} after {time.monotonic() - stop:.1f} s (drained, outbox flushed)")
    expect(code == 0, f"edged run exited {code} on SIGTERM", log)

    def final_telemetry() -> list[Any]:  # the last record, sent while draining
        return [b for b in receiver.bodies("telemetry") if b.get("state") == "draining"]

    deadline = time.monotonic() + 10
    while not final_telemetry() and time.monotonic() < deadline:
        time.sleep(0.05)
    expect(bool(final_telemetry()), "the final telemetry record did not reach the cloud", log)
    final = final_telemetry()[-1]
    counts, gating = final["counts"], final["gating"]
    while len(receiver.bodies("samples")) < counts["uploaded"] and time.monotonic() < deadline:
        time.sleep(0.05)
    with receiver.lock:
        channels = collections.Counter(channel for channel, _ in receiver.records.values())
        messages, rejected, duplicates = receiver.messages, receiver.rejected, receiver.duplicates
        online = sum(receiver.states)
    print(
        f"  cloud: {messages} messages with valid signatures, {rejected} rejected; "
        f"{sum(channels.values())} unique records ("
        + ", ".join(f"{c} {n}" for c, n in sorted(channels.items()))
        + f"); duplicates removed: {duplicates}; the device came online {online} times"
    )
    print(
        f"  samples: {channels['samples']} received = {counts['uploaded']} uploaded in the "
        f"daemon's final telemetry; outbox peaked at {peak} records during the outage, "
        f"{final['outbox']['depth']} left"
    )
    suppressed = ", ".join(
        f"{k.removeprefix('suppressed_').replace('_', ' ')} {v}"
        for k, v in gating.items()
        if k.startswith("suppressed_") and v
    )
    print(
        f"  gating: {counts['inferred']} samples: confident {gating['confident']}, uncertain "
        f"{gating['uncertain']}, audit {gating['audit']}; budget admitted {gating['uploaded']}"
        f", suppressed {suppressed or 'none'}"
    )
    verdicts = results.verdicts
    share = [
        sum(verdicts.get(i) == "uncertain" for i in part) / len(part)
        for part in (range(drift_at), range(drift_at, 2 * drift_at))
    ]
    print(
        f"  local consumer: {len(verdicts)} of {2 * drift_at} samples' results on "
        f"{RESULTS_TOPIC}; uncertain {share[0]:.0%} before the drift, {share[1]:.0%} after"
    )
    drift = [e for _, e in receiver.events if e.get("name") == "drift"]
    expect(rejected == 0, f"{rejected} messages failed signature checks", log)
    expect(channels["samples"] == counts["uploaded"], "uploaded samples went missing", log)
    expect(len(verdicts) == 2 * drift_at, "results went missing on the local broker", log)
    expect(any(e["samples"] > drift_at for e in drift), "no drift event reached the cloud", log)


def main() -> int:
    out = Path("build/demo")
    out.mkdir(parents=True, exist_ok=True)
    bundles = {}
    for name in ("digits", "sensor"):
        bundles[name] = build(name, out)
        serve(bundles[name], out / f"{name}-test.npz")
    daemon_act(bundles["digits"], out / "digits-test.npz", out)
    fleet_act(bundles["digits"], out / "digits-test.npz", out)
    ota_act(bundles["digits"], out / "digits-test.npz", out)
    finetune_act(bundles["digits"], out)
    ship_act(out)
    print(f"\nartifacts in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
