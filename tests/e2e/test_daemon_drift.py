"""The whole device loop on real parts: a real digits stream with a drift injected halfway,
replayed through a real `edged run` process into a real Mosquitto, received and verified by
a cloud-side subscriber, across a SIGTERM and a restart."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edged.identity import DeviceIdentity
from edged_formats import decode_batch
from edged_formats.wire import TOPIC_ROOT
from tests.support.daemon import DaemonProcess, render_toml
from tests.support.subscriber import MqttSubscriber

pytest.importorskip("scipy", reason="scipy (train extra) rotates the drifted digits")
from scipy.ndimage import rotate

CLEAN = 360  # the drift starts at this sample
FEATURE_SHIFT_BOUND = 100  # docs/drift.md: feature shift within 100 samples of a 30° rotation
SAMPLES_PER_HOUR = 40
AUDIT_PER_HOUR = 12  # the default


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="edged-") as d:
        yield Path(d)


def drifted_stream(test_npz: Path, out: Path) -> Path:
    """The held-out digits as they are, then the same digits rotated by 30°."""
    x = np.load(test_npz)["x"]
    turned = np.stack(
        [np.clip(rotate(d.astype(np.float32), 30, reshape=False, order=1), 0, 16) for d in x]
    ).astype(x.dtype)
    path = out / "stream.npz"
    np.savez(path, x=np.concatenate([x, turned]))
    return path


def own_topic_prefix(key_file: Path) -> str:
    """The topics of the device whose key this is (the session broker carries other tests'
    devices, their retained state included)."""
    return f"{TOPIC_ROOT}/{DeviceIdentity.load_or_create(key_file).default_device_id()}/"


def records_by_channel(messages: list[Any], key_file: Path) -> dict[str, dict[tuple, Any]]:
    """Every message of this device with its signature checked; records de-duplicated by
    (boot, seq), as ingest does."""
    identity = DeviceIdentity.load_or_create(key_file)
    device = identity.default_device_id()
    prefix = own_topic_prefix(key_file)
    channels: dict[str, dict[tuple, Any]] = {}
    for message in (m for m in messages if m.topic.startswith(prefix)):
        batch = decode_batch(
            message.topic, message.payload, lambda d: identity.verify_key if d == device else None
        )
        for record in batch.records:
            channels.setdefault(batch.channel, {})[record.key] = record
    return channels


def test_drift_gating_budgets_and_restart(tmp_path, short_dir, digits_build, mosquitto) -> None:
    """Gating keeps the uncertain samples (far more once the drift starts), the hourly upload
    budget holds, a feature-shift drift event fires within the documented bound, and across a
    SIGTERM and a restart every sample is processed and every uploaded sample arrives."""
    out, report = digits_build
    stream = drifted_stream(out / "digits-test.npz", tmp_path)
    results_topic = f"test/{tmp_path.name}/results"
    state = tmp_path / "state"
    config = tmp_path / "edged.toml"
    config.write_text(
        render_toml(
            {
                "device": {"state_dir": str(state), "model": str(out / report.bundle)},
                "source": [
                    {"kind": "replay", "name": "digits", "path": str(stream), "rate_hz": 150}
                ],
                "local_mqtt": {
                    "host": mosquitto.host,
                    "port": mosquitto.port,
                    "results_topic": results_topic,
                },
                "uplink": {"host": mosquitto.host, "port": mosquitto.port},
                "gating": {"budget": {"samples_per_hour": SAMPLES_PER_HOUR}},
                "outbox": {"min_free_mb": 0},
                "status": {"socket": str(short_dir / "status.sock")},
                "telemetry": {"interval_s": 60},
            }
        )
    )
    with (
        MqttSubscriber(mosquitto.host, mosquitto.port, results_topic, timeout=30) as results,
        MqttSubscriber(mosquitto.host, mosquitto.port, "edged/v1/+/#", timeout=30) as cloud,
    ):
        with DaemonProcess(config, tmp_path) as first:
            first.wait_ready()
            first.wait_for(
                lambda: (
                    (s := first.status())["counts"]["inferred"] >= CLEAN + 120
                    and s["drift"]["alarms"]
                ),
                30,
                "the drift alarm",
            )
            assert first.terminate() == 0
        with DaemonProcess(config, tmp_path) as second:
            second.wait_ready()
            second.wait_for(lambda: "reached the end" in second.log(), 30, "the end of the stream")
            second.wait_for(lambda: second.status()["outbox"]["depth"] == 0, 30, "the outbox drain")
            assert second.terminate() == 0
        cloud.wait_for(
            lambda msgs: sum(m.topic.endswith("/telemetry") for m in msgs) >= 2, 30
        )  # each run's final telemetry
        channels = records_by_channel(list(cloud.messages), state / "device.key")
        local = [json.loads(m.payload) for m in results.messages]

    # every sample processed (at least once: a sample in flight at SIGTERM may come twice)
    refs = {int(r["ref"]) for r in local}
    assert refs == set(range(2 * CLEAN))

    # gating: uncertain samples are kept, and far more of them once the digits are rotated
    verdicts: dict[int, str] = {int(r["ref"]): r["verdict"] for r in local}
    clean_uncertain = sum(verdicts[i] == "uncertain" for i in range(CLEAN)) / CLEAN
    drift_uncertain = sum(verdicts[i] == "uncertain" for i in range(CLEAN, 2 * CLEAN)) / CLEAN
    assert clean_uncertain < 0.15
    assert drift_uncertain > 3 * clean_uncertain

    # budgets: at most the hourly allowance per run (a restart starts with a full bucket)
    telemetry = sorted(channels["telemetry"].values(), key=lambda r: r.key)
    finals = {r.boot: r.body for r in telemetry}  # the last telemetry of each boot
    assert len(finals) == 2
    for body in finals.values():
        gating = body["gating"]
        assert gating["uploaded"] <= SAMPLES_PER_HOUR + AUDIT_PER_HOUR
        assert gating["suppressed_hourly_budget"] > 0  # the drift burst hit the budget

    # nothing lost: every sample the daemon queued for upload reached the cloud, once
    samples = channels["samples"]
    assert len(samples) == sum(body["counts"]["uploaded"] for body in finals.values())
    assert all(len(r.body["input"]) == 64 for r in samples.values())
    assert all(len(r.body["embedding"]) > 0 for r in samples.values())  # for fine-tuning
    for body in finals.values():  # health telemetry rides along
        assert body["health"]["proc_rss_mb"] > 0 and body["health"]["disk_free_mb"] > 0
        assert body["latency_ms"]["p99_ms"] > 0
    assert len({r.body["id"] for r in samples.values()}) == len(samples)

    # drift: a durable event within the documented number of samples after the injection,
    # and one per statistic while the drift lasts (no chatter)
    first_boot = min(finals)
    drift = [
        r.body
        for r in channels["events"].values()
        if r.body.get("name") == "drift" and r.boot == first_boot
    ]
    kinds = [e["kind"] for e in drift]
    assert kinds.count("feature_shift") == 1, drift
    assert len(kinds) == len(set(kinds)), drift
    feature = next(e for e in drift if e["kind"] == "feature_shift")
    assert CLEAN < feature["samples"] <= CLEAN + FEATURE_SHIFT_BOUND
