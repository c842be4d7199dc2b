"""The MQTT floor: how fast a bare paho-mqtt QoS 1 publish loop gets PUBACKs from a broker.

`bare_publish_rate(host, port)` is the baseline the uplink benchmark divides by, measured
against the same broker in the same run: one paho-mqtt 2.x MQTT v5 client, its network thread
started with `loop_start()`, `max_inflight_messages_set(100)`, publishing `count` messages of
`payload_size` random bytes with QoS 1 as fast as `publish()` returns, timed from the first
publish until `on_publish` has fired for the last one (every PUBACK received). A short warm-up
(connection, broker allocations) runs before the clock starts. Nobody subscribes, so the figure
is the client + broker round trip, not a fan-out.

`run()` makes this a benchmark of its own (so `python -m bench.run` can load the module):
the median of a few rounds against a Mosquitto started for the purpose on a free port,
reported against the figure MEASURED.md gives for the reference machine.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from bench.common import Result, conditions, median

__all__ = ["bare_publish_rate", "run"]

MAX_INFLIGHT = 100
ROUNDS = 5
REFERENCE_RATE = 8500.0  # MEASURED.md: paho 2.2, QoS 1, 100 B, local Mosquitto 2.0.11, 2 cores


def bare_publish_rate(
    host: str,
    port: int,
    payload_size: int = 100,
    count: int = 20000,
    *,
    topic: str | None = None,
    max_inflight: int = MAX_INFLIGHT,
    warmup: int = 500,
    timeout: float = 120.0,
) -> float:
    """Messages per second of a bare paho QoS 1 publish loop, all PUBACKs included."""
    topic = topic or f"bench/bare/{uuid.uuid4().hex[:8]}"
    payload = os.urandom(payload_size)
    done = threading.Condition()
    acked = 0
    failed: list[int] = []
    connected = threading.Event()

    def on_connect(
        client: mqtt.Client, userdata: object, flags: object, reason: ReasonCode, props: object
    ) -> None:
        if not reason.is_failure:
            connected.set()

    def on_publish(
        client: mqtt.Client, userdata: object, mid: int, reason: ReasonCode, props: object
    ) -> None:
        nonlocal acked
        if reason.is_failure:  # "no matching subscribers" (0x10) is a success
            failed.append(mid)
        with done:
            acked += 1
            done.notify_all()

    def wait_acked(total: int) -> None:
        with done:
            if not done.wait_for(lambda: acked >= total, timeout):
                raise TimeoutError(f"{acked} of {total} PUBACKs within {timeout} s")

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"bench-bare-{uuid.uuid4().hex[:8]}",
        protocol=mqtt.MQTTv5,
    )
    client.max_inflight_messages_set(max_inflight)
    client.on_connect = on_connect
    client.on_publish = on_publish
    client.connect(host, port, keepalive=60)
    client.loop_start()
    try:
        if not connected.wait(10):
            raise TimeoutError(f"no CONNACK from {host}:{port}")
        for _ in range(warmup):
            client.publish(topic, payload, qos=1)
        wait_acked(warmup)
        started = time.perf_counter()
        for _ in range(count):
            client.publish(topic, payload, qos=1)
        wait_acked(warmup + count)
        elapsed = time.perf_counter() - started
    finally:
        client.disconnect()
        client.loop_stop()
    if failed:
        raise RuntimeError(f"{len(failed)} publishes refused by the broker")
    return count / elapsed


def _mosquitto_version(binary: str) -> str:
    out = subprocess.run([binary, "-h"], capture_output=True, text=True, check=False).stdout
    first = out.splitlines()[0] if out else "mosquitto (version unknown)"
    return first.replace(" version", "")


def run() -> Result:
    from control_plane.local_broker import MosquittoBroker

    payload_size, count = 100, 20000
    with MosquittoBroker() as broker:
        rates = [
            bare_publish_rate(broker.host, broker.port, payload_size, count) for _ in range(ROUNDS)
        ]
        version = _mosquitto_version(str(broker.binary))
    value = median(rates)
    return Result(
        name="mqtt_baseline",
        value=round(value, 1),
        unit="msg/s",
        baseline=REFERENCE_RATE,
        baseline_is=(
            "MEASURED.md's figure for the reference machine (paho 2.2, QoS 1, 100 B payloads, "
            "local Mosquitto 2.0.11, 2 cores); a sanity check of this machine's broker path"
        ),
        target="ratio >= 0.5",
        metrics={"rounds_msg_s": [round(r, 1) for r in rates]},
        conditions=conditions(
            broker=version,
            broker_config="test-suite defaults: loopback, no persistence, default inflight",
            payload_bytes=payload_size,
            messages_per_round=count,
            rounds=ROUNDS,
            client_max_inflight=MAX_INFLIGHT,
        ),
    )
