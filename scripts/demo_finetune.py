"""`make demo`, act 6: one drifted device fine-tunes itself on the labels it receives
(docs/finetune.md).

The control plane on embedded defaults; one daemon enrolled through the real flow, with a
device-local Mosquitto for its results. Its camera is tilted by 25°: the digits model's accuracy
falls. The daemon keeps and uploads its uncertain samples; an annotator (this script, which knows
each frame's true digit by its `ref`) reads them through `GET /v1/samples` and labels them with
`POST /v1/devices/{id}/labels`. The labels reach the device over MQTT; with 300 of them the
daemon starts its fine-tune worker (a separate low-priority process, torch), which trains the
classifier head on the labels plus the bundle's replay set and gates the candidate. It passes,
installs through the A/B slots and the health trial, and the accuracy on held-out tilted frames
(never labelled, never trained on) recovers. Operators then switch personalisation off for the
group: the device goes back to the cloud's model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import paho.mqtt.client as mqtt
from demo_fleet import _ready, _run, _wait, device_config, enrol_device, read_status
from paho.mqtt.enums import CallbackAPIVersion

from control_plane.local_broker import MosquittoBroker, free_port
from control_plane.toolchain.datasets import digits_dataset, rotated
from edged_formats import read_bundle

BIN = Path(sys.executable).parent
GROUP = "demo-tilted"
DEGREES = 25
RESULTS_TOPIC = "edged/local/results"
LABELS_NEEDED = 300


class Accuracy:
    """A local consumer of the results topic: accuracy on the held-out frames, per model."""

    def __init__(self, host: str, port: int, truth: np.ndarray, held_out: np.ndarray) -> None:
        self.truth, self.held_out = truth, held_out
        self.hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        self.lock = threading.Lock()
        subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, *_: c.subscribe(RESULTS_TOPIC, qos=0)
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise SystemExit("demo step failed: the local consumer could not subscribe")

    def _on_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        result = json.loads(message.payload)
        ref = int(result["ref"])
        if self.held_out[ref]:
            with self.lock:
                seen = self.hits[result["model"]]
                seen[0] += int(result["top1"]) == int(self.truth[ref])
                seen[1] += 1

    def of(self, model: str) -> tuple[float, int]:
        with self.lock:
            hits, n = self.hits.get(model, [0, 0])
        return (hits / n if n else float("nan")), n

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


FINETUNE_POLICY = f"""\
[local_mqtt]
host = "127.0.0.1"
port = {{local_port}}
results_topic = "{RESULTS_TOPIC}"

[gating.budget]
samples_per_hour = 100000
class_per_hour = 10000

[update]
poll_s = 60
watch_s = 4
min_watch_samples = 40

[finetune]
enabled = true
min_labels = {LABELS_NEEDED}
min_new_labels = {LABELS_NEEDED}
min_interval_s = 0
"""


def finetune_act(bundle: Path, out: Path) -> None:
    print("\n== on-device fine-tuning: a tilted camera learns from the labels it gets", flush=True)
    work = out / "finetune"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data = digits_dataset()
    pool = len(data.x_train) + len(data.x_val)
    frames = rotated(np.concatenate([data.x_train, data.x_val, data.x_test]), DEGREES)
    labels = np.concatenate([data.y_train, data.y_val, data.y_test])
    # the held-out test frames (never labelled) interleaved with the ones to label, from the start
    order = np.argsort(
        np.concatenate(
            [np.arange(pool) / pool, (np.arange(len(data.x_test)) + 0.5) / len(data.x_test)]
        ),
        kind="stable",
    )
    stream, truth, held_out = frames[order], labels[order], order >= pool
    np.savez(work / "camera.npz", x=stream)
    port = free_port()
    env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "EDGED_CP_DATABASE_URL": f"sqlite+aiosqlite:///{work / 'cp.db'}",
        "EDGED_CP_DATA_DIR": str(work / "cp-data"),
        "EDGED_CP_PORT": str(port),
    }
    cp = str(BIN / "edged-control-plane")
    _run(cp, "migrate", env=env)
    admin = _run(cp, "create-token", "--name", "demo-admin", "--role", "admin", env=env)
    url = f"http://127.0.0.1:{port}"
    with (
        MosquittoBroker(workdir=work / "local-broker") as local,
        open(work / "control-plane.log", "wb") as cp_log,
    ):
        server = subprocess.Popen([cp, "serve"], env=env, stdout=cp_log, stderr=subprocess.STDOUT)
        daemon: subprocess.Popen[bytes] | None = None
        accuracy = Accuracy(local.host, local.port, truth, held_out)
        try:
            api = httpx.Client(
                base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=30
            )
            _wait(lambda: _ready(url), 30, "the control plane was not ready")
            state = work / "device"
            device = enrol_device(api, url, GROUP, ["tilted"], state, env)
            config = work / "device.toml"
            policy = FINETUNE_POLICY.replace("{local_port}", str(local.port))
            device_config(config, bundle, work / "camera.npz", state, rate_hz=150, sections=policy)
            log = open(work / "device.log", "wb")  # noqa: SIM115 - lives with the daemon
            daemon = subprocess.Popen(
                [str(BIN / "edged"), "run", "--config", str(config)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            print(f"  device {device} enrolled; its camera is tilted by {DEGREES}°")
            _label_until_tuned(api, bundle, device, state, truth, held_out, accuracy)
            _switch_off(api, device, state, accuracy)
        finally:
            accuracy.close()
            if daemon is not None and daemon.poll() is None:
                daemon.terminate()
                try:
                    daemon.wait(20)
                except subprocess.TimeoutExpired:
                    daemon.kill()
            server.terminate()
            server.wait(20)
    print("  daemon and control plane stopped (SIGTERM)")


def _status(state: Path) -> dict[str, Any]:
    return read_status(state / "status.sock") or {}


def _label_until_tuned(
    api: httpx.Client,
    bundle: Path,
    device: str,
    state: Path,
    truth: np.ndarray,
    held_out: np.ndarray,
    accuracy: Accuracy,
) -> None:
    """The annotator: label every uploaded uncertain sample of the tilted camera (by its ref)
    until the device has installed a personalised model."""
    labelled: set[str] = set()
    started = time.monotonic()
    base = ""
    last_line = ""
    while time.monotonic() < started + 240:
        status = _status(state)
        model = status.get("model") or {}
        base = base or model.get("version", "")
        finetune = status.get("finetune") or {}
        batch = _unlabelled(api, device, labelled, truth, held_out)
        if batch:
            posted = api.post(f"/v1/devices/{device}/labels", json={"labels": batch})
            if posted.status_code != 202:
                raise SystemExit(f"demo failed: labels refused: {posted.text}")
            labelled.update(entry["sample_id"] for entry in batch)
        before, n_before = accuracy.of(base)
        line = (
            f"labels posted {len(labelled):4d}, on the device {finetune.get('labels', 0):4d}; "
            f"worker {'running' if finetune.get('running') else 'idle   '}; "
            f"model {model.get('version')}; held-out accuracy {before:.3f} (n={n_before})"
        )
        if line != last_line:
            print(f"  {time.monotonic() - started:5.1f}s  {line}", flush=True)
            last_line = line
        if model.get("base") == base and not (status.get("slots") or {}).get("trial"):
            break
        time.sleep(1.0)
    else:
        raise SystemExit("demo failed: the device did not install a personalised model")
    tuned = model["version"]
    _wait(lambda: accuracy.of(tuned)[1] >= 200, 60, "the personalised model's traffic")
    _show_jobs(api, device)
    before, n_before = accuracy.of(base)
    after, n_after = accuracy.of(tuned)
    upright = float(read_bundle(bundle.read_bytes()).manifest.metrics["test_accuracy"])
    print(
        f"  held-out tilted digits: {base} {before:.3f} (n={n_before}) -> "
        f"{tuned} {after:.3f} (n={n_after}); upright {upright:.3f}: "
        f"{(after - before) / (upright - before):.0%} of the drift loss recovered"
    )
    if not after > before + 0.1:
        raise SystemExit(f"demo failed: accuracy did not recover ({before:.3f} -> {after:.3f})")


def _unlabelled(
    api: httpx.Client, device: str, labelled: set[str], truth: np.ndarray, held_out: np.ndarray
) -> list[dict[str, str]]:
    """The annotator's next batch: uploaded samples of the labelled part of the stream not
    labelled yet, with their true digit (up to twice what the device needs)."""
    batch: list[dict[str, str]] = []
    cursor = None
    while len(labelled) + len(batch) < 2 * LABELS_NEEDED:
        params: dict[str, Any] = {"device_id": device, "limit": 200}
        if cursor:
            params["cursor"] = cursor
        page = api.get("/v1/samples", params=params).json()
        for sample in page["items"]:
            meta = sample["meta"]
            if meta["id"] not in labelled and not held_out[int(meta["ref"])]:
                batch.append({"sample_id": meta["id"], "label": str(truth[int(meta["ref"])])})
        cursor = page.get("next_cursor")
        if not cursor:
            break
    return batch


def _show_jobs(api: httpx.Client, device: str) -> None:
    """Every fine-tune job the device reported, as the control plane stored it."""
    events = api.get(
        "/v1/events", params={"device_id": device, "name": "finetune", "limit": 50}
    ).json()["items"]
    for event in sorted(events, key=lambda e: (e["boot"], e["seq"])):
        r = event["body"]
        print(
            f"  job {r.get('job')} ({r.get('trigger')}, {r.get('labels')} labels, "
            f"trained {r.get('trained')}): "
            f"{r.get('verdict')} - {r.get('reason')}; hold-out {r.get('holdout_current')} -> "
            f"{r.get('holdout_candidate')}, replay {r.get('replay_base')} -> "
            f"{r.get('replay_candidate')}; worker {r.get('wall_s')} s, "
            f"peak {r.get('peak_rss_mb')} MB"
        )


def _switch_off(api: httpx.Client, device: str, state: Path, accuracy: Accuracy) -> None:
    print("\n== operator: personalisation off for the group; the cloud's model comes back")
    put = api.put(f"/v1/groups/{GROUP}/personalisation", json={"enabled": False})
    print(f"  PUT /v1/groups/{GROUP}/personalisation {{enabled: false}} -> {put.status_code}")

    def back() -> dict[str, Any] | None:
        status = _status(state)
        model = status.get("model") or {}
        settled = model.get("base") is None and not (status.get("slots") or {}).get("trial")
        return status if settled and model.get("version") else None

    status = _wait(back, 60, "the device did not go back to the cloud's model")
    print(f"  device serves {status['model']['version']} again (lineage base: none)")
