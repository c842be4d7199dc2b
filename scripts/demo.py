"""`make demo`: everything edged can do so far, end to end, on real parts.

1. The cloud toolchain trains the reference models (a CNN on scikit-learn's digits, a 1-D CNN
   on real smartwatch IMU recordings), converts them with litert-torch, int8-quantises them
   with ai-edge-quantizer and packs bundles.
2. Separate device processes (no torch) inspect each bundle and stream its held-out data
   through the LiteRT engine one sample at a time: accuracy, latency, confidence histogram.
3. Store and forward: a device process replays the digits at 300 samples/s into its SQLite
   outbox and an MQTT 5 uplink to a local Mosquitto; the broker is stopped mid-stream and
   started again; a receiver checks every message's ed25519 signature and de-duplicates
   records by (device, boot, seq), as the cloud's ingest will.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from control_plane.local_broker import MosquittoBroker
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


class Receiver:
    """The cloud end for the demo: subscribes to every device topic, verifies signatures
    against the device's public key, and keeps each record once."""

    def __init__(self, host: str, port: int, key_file: Path) -> None:
        self.key_file = key_file
        self.records: dict[tuple[str, int, int], str] = {}
        self.messages = self.duplicates = self.rejected = 0
        self.states: list[bool] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="demo-cloud", protocol=mqtt.MQTTv5
        )
        self.client.on_connect = lambda c, *_: c.subscribe("edged/v1/+/#", qos=1)
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(min_delay=1, max_delay=1)
        self.client.connect(host, port)
        self.client.loop_start()

    def _verify_key(self, device: str):
        identity = DeviceIdentity.load_or_create(self.key_file)
        return identity.verify_key if device == identity.default_device_id() else None

    def _on_message(self, _client, _userdata, message) -> None:
        try:
            batch = decode_batch(message.topic, message.payload, self._verify_key)
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
                key = (batch.device, *record.key)
                if key in self.records:
                    self.duplicates += 1
                self.records[key] = batch.channel

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def store_and_forward(bundle: Path, data: Path, out: Path) -> None:
    step("device -> SQLite outbox -> MQTT 5 uplink -> Mosquitto -> cloud receiver")
    device_dir = out / "device"
    for stale in (device_dir, out / "broker"):  # a fresh device and broker every run
        shutil.rmtree(stale, ignore_errors=True)
    DeviceIdentity.load_or_create(device_dir / "device.key")  # what enrollment will register
    with MosquittoBroker(workdir=out / "broker", persistence=True) as broker:
        receiver = Receiver(broker.host, broker.port, device_dir / "device.key")
        device = subprocess.Popen(
            [
                str(BIN / "edged"),
                "replay",
                str(bundle),
                str(data),
                "--rate",
                "300",
                "--forward",
                f"{broker.host}:{broker.port}",
                "--state-dir",
                str(device_dir),
                "--json",
            ],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        )
        time.sleep(0.4)
        broker.stop()
        print("  broker stopped while the device streams...")
        time.sleep(0.8)
        broker.start()
        print("  broker started again")
        stdout, _ = device.communicate(timeout=120)
        if device.returncode != 0:
            raise SystemExit("demo step failed: edged replay --forward")
        report = json.loads(stdout)
        expected = report["forwarded"]["records"]
        deadline = time.monotonic() + 10
        while len(receiver.records) < expected and time.monotonic() < deadline:
            time.sleep(0.05)
        receiver.close()
    fwd = report["forwarded"]
    print(
        f"  device {fwd['device_id']}: {report['samples']} predictions, "
        f"{fwd['kept_samples']} uncertain samples kept; outbox peaked at "
        f"{fwd['max_depth']} records during the outage, {fwd['left_in_outbox']} left"
    )
    print(
        f"  uplink: {fwd['connects']} connections, {fwd['messages']} messages for "
        f"{fwd['records']} records"
    )
    channels = sorted(set(receiver.records.values()))
    print(
        f"  cloud: {receiver.messages} messages verified, {receiver.rejected} rejected, "
        f"{len(receiver.records)} unique records on {', '.join(channels)}, "
        f"{receiver.duplicates} duplicates removed; online states seen {receiver.states}"
    )


def main() -> int:
    out = Path("build/demo")
    out.mkdir(parents=True, exist_ok=True)
    bundles = {}
    for name in ("digits", "sensor"):
        bundles[name] = build(name, out)
        serve(bundles[name], out / f"{name}-test.npz")
    store_and_forward(bundles["digits"], out / "digits-test.npz", out)
    print(f"\nartifacts in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
