"""On-device fine-tuning on real parts: a real `edged run` daemon serving the digits model meets
rotated digits, an application on the local Mosquitto reports the ground truth of what it saw,
the daemon starts the real worker process (torch), the candidate passes the gate, installs
through the slots and the health trial, and the accuracy on held-out rotated digits recovers.
Shuffled ground truth is refused by the gate; `kill -9` of the worker at any step leaves the
old model serving."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import psutil
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.daemon import DaemonProcess, render_toml
from tests.support.subscriber import MqttSubscriber

pytestmark = [pytest.mark.train, pytest.mark.slow]
pytest.importorskip("scipy", reason="scipy (train extra) rotates the drifted digits")

DEGREES = 25
BASE = "1.0.0"
WORKER_STEPS = ("finetune_launched", "finetune_embedded", "finetune_trained", "finetune_gated")


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="edged-") as d:
        yield Path(d)


@pytest.fixture(scope="module")
def rotated() -> dict[str, np.ndarray]:
    """Rotated digits: `pool` (train + validation split) to label, `test` to measure on."""
    from control_plane.toolchain.datasets import digits_dataset, rotated

    data = digits_dataset()
    return {
        "pool_x": rotated(np.concatenate([data.x_train, data.x_val]), DEGREES),
        "pool_y": np.concatenate([data.y_train, data.y_val]),
        "test_x": rotated(data.x_test, DEGREES),
        "test_y": data.y_test,
        "clean_x": data.x_test,
    }


class TruthTeller:
    """The application: for every result from the `labels` source it reports what the sample
    really was (`truth[ref]`) on the daemon's truth topic."""

    def __init__(self, host: str, port: int, results: str, truth_topic: str, truth: Any) -> None:
        self.truth_topic, self.truth = truth_topic, truth
        self.sent = 0
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self._subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: self._subscribed.set()
        self.client.connect(host, port)
        self.client.subscribe(results, qos=0)
        self.client.loop_start()
        assert self._subscribed.wait(10), "the results subscription was not acknowledged"

    def _on_message(self, client: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        result = json.loads(message.payload)
        if result["source"] == "labels":
            label = str(int(self.truth[int(result["ref"])]))
            body = {"ref": result["ref"], "source": "labels", "label": label}
            client.publish(self.truth_topic, json.dumps(body), qos=1)
            self.sent += 1

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _config(
    tmp_path: Path,
    short_dir: Path,
    digits_build: Any,
    mosquitto: Any,
    data: dict[str, Any],
    update: dict[str, Any] | None = None,
    **ft: Any,
) -> tuple[Path, str, str]:
    out, report = digits_build
    np.savez(tmp_path / "pool.npz", x=data["pool_x"])
    np.savez(tmp_path / "eval.npz", x=data["test_x"])
    results, truth = f"test/{tmp_path.name}/results", f"test/{tmp_path.name}/truth"
    config = tmp_path / "edged.toml"
    finetune = {
        "enabled": True,
        "truth_topic": truth,
        "min_labels": 300,
        "min_new_labels": 300,
        "min_interval_s": 0,
        **ft,
    }
    config.write_text(
        render_toml(
            {
                "device": {"state_dir": str(tmp_path / "state"), "model": str(out / report.bundle)},
                "source": [
                    {
                        "kind": "replay",
                        "name": "labels",
                        "path": str(tmp_path / "pool.npz"),
                        "rate_hz": 200,
                        "loop": True,
                    },
                    {
                        "kind": "replay",
                        "name": "eval",
                        "path": str(tmp_path / "eval.npz"),
                        "rate_hz": 60,
                        "loop": True,
                    },
                ],
                "local_mqtt": {
                    "host": mosquitto.host,
                    "port": mosquitto.port,
                    "results_topic": results,
                },
                "uplink": {"host": mosquitto.host, "port": mosquitto.port},
                "outbox": {"min_free_mb": 0},
                # these tests are about what fine-tuning installs, not latency: a loaded
                # machine (xdist) can slow a trial window past the 2x default
                "update": {
                    "watch_s": 3,
                    "min_watch_samples": 30,
                    "max_latency_ratio": 50.0,
                    **(update or {}),
                },
                "finetune": finetune,
                "status": {"socket": str(short_dir / "status.sock")},
                "telemetry": {"interval_s": 60},
            }
        )
    )
    return config, results, truth


def _accuracy(results: list[dict[str, Any]], truth: np.ndarray, version: str) -> tuple[float, int]:
    mine = [r for r in results if r["source"] == "eval" and r["model"] == version]
    hits = sum(int(r["top1"]) == int(truth[int(r["ref"])]) for r in mine)
    return (hits / len(mine) if mine else float("nan")), len(mine)


def _finetune_events(messages: list[Any], key_file: Path) -> list[dict[str, Any]]:
    from tests.e2e.test_daemon_drift import records_by_channel

    channels = records_by_channel(list(messages), key_file)
    events = sorted(channels.get("events", {}).items())
    return [r.body for _, r in events if r.body.get("name") == "finetune"]


def test_drifted_device_fine_tunes_passes_the_gate_and_recovers(
    tmp_path, short_dir, digits_build, mosquitto, rotated
) -> None:
    config, results_topic, truth_topic = _config(
        tmp_path, short_dir, digits_build, mosquitto, rotated
    )
    running_at: list[float] = []
    arrivals: list[float] = []
    with (
        MqttSubscriber(mosquitto.host, mosquitto.port, results_topic, timeout=60) as results,
        MqttSubscriber(mosquitto.host, mosquitto.port, "edged/v1/+/events", timeout=60) as cloud,
    ):
        teller = TruthTeller(
            mosquitto.host, mosquitto.port, results_topic, truth_topic, rotated["pool_y"]
        )
        try:
            with DaemonProcess(config, tmp_path) as daemon:
                daemon.wait_ready()
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    status = daemon.status()
                    if status["finetune"]["running"]:
                        running_at.append(time.monotonic())
                        arrivals.append(len(results.messages))
                    if status["model"]["version"] != BASE and not status["slots"]["trial"]:
                        break
                    time.sleep(0.1)
                status = daemon.status()
                assert status["model"] == {
                    "name": status["model"]["name"],
                    "version": f"{BASE}+local.1",
                    "base": BASE,
                }, (status["finetune"], daemon.log()[-3000:])
                shown = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "edged.cli",
                        "status",
                        "--socket",
                        str(short_dir / "status.sock"),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                assert f"{BASE}+local.1 (personalised, base {BASE})" in shown, shown
                assert "finetune on, " in shown and "last installed" in shown, shown
                n_after = len(results.messages)
                results.wait_for(lambda m: len(m) >= n_after + 250, 30)  # traffic on the new one
                assert daemon.terminate() == 0
        finally:
            teller.close()
        key = tmp_path / "state" / "device.key"
        cloud.wait_for(lambda m: len(_finetune_events(m, key)) > 0, 30)
        events = _finetune_events(cloud.messages, key)
        local = [json.loads(m.payload) for m in results.messages]

    before, n_before = _accuracy(local, rotated["test_y"], BASE)
    after, n_after_results = _accuracy(local, rotated["test_y"], f"{BASE}+local.1")
    assert n_before >= 50 and n_after_results >= 50
    assert after >= before + 0.15, (before, after)

    report = next(e for e in events if e.get("version") == f"{BASE}+local.1")
    assert report["verdict"] == "installed" and report["install"] == "committed", report
    assert report["base"]["version"] == BASE and report["version"] == f"{BASE}+local.1"
    assert report["holdout_candidate"] >= report["holdout_current"] + 0.02
    assert report["replay_candidate"] >= report["replay_base"] - 0.02
    delta = report["head_delta"]
    weight = np.frombuffer(delta["weight"], delta["dtype"]).reshape(delta["shape"])
    assert weight.shape == (10, 64) and np.abs(weight).max() > 0

    # inference kept answering while the worker ran: results arrived throughout
    assert running_at, "the worker was never seen running"
    span = running_at[-1] - running_at[0]
    assert span >= 0.5, f"the worker was seen running for {span:.2f} s only"
    rate = (arrivals[-1] - arrivals[0]) / span
    assert rate >= 0.5 * 260, f"{rate:.0f} results/s while fine-tuning, nominal 260"


def test_shuffled_ground_truth_is_refused_and_nothing_installs(
    tmp_path, short_dir, digits_build, mosquitto, rotated
) -> None:
    shuffled = np.random.default_rng(7).permutation(rotated["pool_y"])
    config, results_topic, truth_topic = _config(
        tmp_path, short_dir, digits_build, mosquitto, rotated
    )
    teller = TruthTeller(mosquitto.host, mosquitto.port, results_topic, truth_topic, shuffled)
    try:
        with DaemonProcess(config, tmp_path) as daemon:
            daemon.wait_ready()
            daemon.wait_for(
                lambda: (daemon.status()["finetune"]["last"] or {}).get("verdict") is not None,
                120,
                "the first job's verdict",
            )
            status = daemon.status()
            assert status["finetune"]["last"]["verdict"] == "rejected", status["finetune"]
            assert "hold-out" in status["finetune"]["last"]["reason"]
            assert status["model"]["version"] == BASE
            assert status["slots"]["trial"] is None or not status["slots"]["trial"]
            assert "ota.staged" not in daemon.log()
            assert daemon.terminate() == 0
    finally:
        teller.close()
    assert _label_sources(tmp_path) == {"local"}  # pseudo-labels are off by default


@pytest.mark.parametrize("step", WORKER_STEPS)
def test_kill_9_of_the_worker_at_any_step_leaves_the_old_model_serving(
    step, tmp_path, short_dir, digits_build, mosquitto, rotated
) -> None:
    config, results_topic, truth_topic = _config(
        tmp_path, short_dir, digits_build, mosquitto, rotated
    )
    teller = TruthTeller(
        mosquitto.host, mosquitto.port, results_topic, truth_topic, rotated["pool_y"]
    )
    try:
        env = {"EDGED_FAULT_PAUSE_AT": step}
        with DaemonProcess(config, tmp_path, env=env) as daemon:
            daemon.wait_ready()
            daemon.wait_for(
                lambda: _stopped_worker(daemon) is not None, 90, f"the worker at {step}"
            )
            worker = _stopped_worker(daemon)
            assert worker is not None
            inferred = daemon.status()["counts"]["inferred"]
            os.kill(worker.pid, signal.SIGKILL)
            daemon.wait_for(
                lambda: (daemon.status()["finetune"]["last"] or {}).get("verdict") == "failed",
                30,
                "the job reported failed",
            )
            status = daemon.status()
            assert "killed by signal 9" in status["finetune"]["last"]["reason"], status["finetune"]
            assert status["model"]["version"] == BASE
            assert status["slots"]["active"]["version"] == BASE
            assert status["counts"]["inferred"] > inferred  # served all along
            assert not (tmp_path / "state" / "finetune" / "jobs" / "1" / "result.json").exists()
            assert daemon.terminate() == 0
    finally:
        teller.close()


def _stopped_worker(daemon: DaemonProcess) -> psutil.Process | None:
    """The daemon's worker process once it stopped itself at the fault point."""
    assert daemon.process is not None
    for child in psutil.Process(daemon.process.pid).children(recursive=True):
        try:
            if child.status() == psutil.STATUS_STOPPED and "edged.finetune" in " ".join(
                child.cmdline()
            ):
                return child
        except psutil.NoSuchProcess:
            continue
    return None


def test_a_new_base_is_personalised_again_from_the_label_store(
    tmp_path, short_dir, digits_build, mosquitto, rotated
) -> None:
    """The cloud's model stays the base: a new base installed over a personalised model (here
    a changed `device.model` and SIGHUP, the same install path as an OTA update) is
    personalised again from the stored labels, and the lineage names the new base."""
    from edged.finetune.export import head_updated_bundle
    from edged_formats import read_bundle

    out, report = digits_build
    base = read_bundle((out / report.bundle).read_bytes())
    weight, bias = base.head_weights()
    newer = head_updated_bundle(base, weight * 1.01, bias, base.canary_inputs, "1.1.0")
    (tmp_path / "newer.edb").write_bytes(newer)
    # the cloud's new model may be less confident on this camera: its trial lets it through
    config, results_topic, truth_topic = _config(
        tmp_path,
        short_dir,
        digits_build,
        mosquitto,
        rotated,
        update={"max_confidence_drop": 1.0},
    )
    teller = TruthTeller(
        mosquitto.host, mosquitto.port, results_topic, truth_topic, rotated["pool_y"]
    )
    try:
        with DaemonProcess(config, tmp_path) as daemon:
            daemon.wait_ready()
            daemon.wait_for(lambda: _personalised_on(daemon, BASE), 120, "1.0.0 personalised")
            teller.close()  # no new labels from here: what follows comes from the store
            _wait_quiet(daemon)  # labels still on their way would start a job of their own
            text = config.read_text()
            config.write_text(text.replace(str(out / report.bundle), str(tmp_path / "newer.edb")))
            daemon.signal(signal.SIGHUP)
            daemon.wait_for(
                lambda: _personalised_on(daemon, "1.1.0", idle=True), 120, "1.1.0 personalised"
            )
            status = daemon.status()
            assert status["model"]["version"].startswith("1.1.0+local.")
            # 1.1.0 got a job of the new base's own (labels still arriving on a loaded machine
            # may start later jobs of their own on 1.1.0, so not necessarily the last one)
            jobs = re.findall(
                r"event=finetune .*trigger=(\S+) .*version=1\.1\.0\+local", daemon.log()
            )
            assert "new_base" in jobs, daemon.log()[-4000:]
            assert status["finetune"]["last"]["base"]["version"] == "1.1.0"
            assert daemon.terminate() == 0
    finally:
        teller.close()


def _wait_quiet(daemon: DaemonProcess, quiet_s: float = 3.0, timeout_s: float = 120) -> None:
    """Until no label has arrived for `quiet_s`, no job runs and no trial is on."""
    deadline = time.monotonic() + timeout_s
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        status = daemon.status()
        busy = status["finetune"]["running"] or status["slots"]["trial"]
        if status["finetune"]["labels"] != last or busy:
            last, since = status["finetune"]["labels"], time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return
        time.sleep(0.2)
    raise AssertionError(f"labels or jobs never settled: {daemon.status()['finetune']}")


def _personalised_on(daemon: DaemonProcess, base: str, idle: bool = False) -> bool:
    """Serving a personalised model on `base`; with `idle` also no trial on and no job running
    (a job reports after its trial ended). While labels stream in, jobs follow one another with
    a fraction of a second between them, so only a quiet device is ever seen idle."""
    status = daemon.status()
    busy = status["slots"]["trial"] or status["finetune"]["running"]
    personalised = status["model"]["version"].startswith(f"{base}+local.")
    return status["model"]["base"] == base and personalised and not (idle and busy)


def test_pseudo_labels_label_confident_results_when_turned_on(
    tmp_path, short_dir, digits_build, mosquitto, rotated
) -> None:
    upright = {**rotated, "pool_x": rotated["clean_x"]}  # confident traffic, no ground truth
    config, _, _ = _config(
        tmp_path,
        short_dir,
        digits_build,
        mosquitto,
        upright,
        pseudo_label_confidence=0.9,
        min_labels=1000000,
    )
    with DaemonProcess(config, tmp_path) as daemon:
        daemon.wait_ready()
        daemon.wait_for(lambda: daemon.status()["finetune"]["labels"] >= 20, 60, "pseudo-labels")
        assert daemon.terminate() == 0
    assert _label_sources(tmp_path) == {"pseudo"}


def _label_sources(tmp_path: Path) -> set[str]:
    with sqlite3.connect(tmp_path / "state" / "labels.db") as db:
        return {row[0] for row in db.execute("SELECT source FROM labels")}
