"""The daemon as systemd runs it: a real `edged run` process, real notify socket, real model,
real SQLite files, real Mosquitto; signals are real signals."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from paho.mqtt import publish

from tests.support.daemon import DaemonProcess, render_toml
from tests.support.subscriber import MqttSubscriber

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def digits(digits_build) -> tuple[Path, Path]:
    """The digits bundle and its held-out stream (360 samples, uint8 8x8x1)."""
    out, report = digits_build
    return out / report.bundle, out / "digits-test.npz"


@pytest.fixture
def short_dir() -> Any:
    """A directory with a short path for unix sockets (107-byte limit)."""
    with tempfile.TemporaryDirectory(prefix="edged-") as d:
        yield Path(d)


def config(
    tmp_path: Path, short_dir: Path, bundle: Path, *, sources: list[dict[str, Any]], **extra: Any
) -> Path:
    body: dict[str, Any] = {
        "device": {"state_dir": str(tmp_path / "state"), "model": str(bundle)},
        "source": sources,
        "uplink": {"enabled": False},
        "outbox": {"min_free_mb": 0},
        "status": {"socket": str(short_dir / "status.sock")},
        "telemetry": {"interval_s": 1},
        **extra,
    }
    path = tmp_path / "edged.toml"
    path.write_text(render_toml(body))
    return path


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def test_ready_status_watchdog_and_clean_stop(tmp_path, short_dir, digits) -> None:
    """READY=1 only after the first inference, STATUS= names the model, WATCHDOG=1 keeps
    coming, `edged status` answers over the socket, and SIGTERM exits 0 after STOPPING=1."""
    bundle, data = digits
    path = config(
        tmp_path,
        short_dir,
        bundle,
        sources=[{"kind": "replay", "name": "digits", "path": str(data), "rate_hz": 100}],
    )
    with DaemonProcess(path, tmp_path, watchdog_s=1.0) as daemon:
        daemon.wait_ready()
        ready = daemon.notified("READY=1")
        assert any("model digits-cnn 1.0.0" in line for line in daemon.notified("STATUS="))
        assert any("; queue " in line for line in daemon.notified("STATUS="))
        assert ready
        daemon.wait_for(lambda: len(daemon.notified("WATCHDOG=1")) >= 3, 10, "watchdog pings")
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
        assert "model    digits-cnn 1.0.0" in shown and "outbox   depth" in shown
        status = daemon.status()
        assert status["model"] == {"name": "digits-cnn", "version": "1.0.0", "base": None}
        assert status["state"] == "running"
        assert status["counts"]["inferred"] > 0
        assert status["latency_ms"]["p99_ms"] is not None
        assert status["outbox"]["refused"] == 0 and status["outbox"]["recovered"] is None
        assert daemon.terminate() == 0
        assert daemon.notified("STOPPING=1")
        assert "event=stopped" in daemon.log()


def test_a_stuck_loop_stops_the_watchdog(tmp_path, short_dir, digits) -> None:
    """A result consumer that blocks the event loop for 3 s stops WATCHDOG=1 for that long,
    so systemd (WatchdogSec) would restart the daemon; afterwards the pings resume."""
    bundle, data = digits
    path = config(
        tmp_path,
        short_dir,
        bundle,
        sources=[{"kind": "replay", "name": "digits", "path": str(data), "rate_hz": 50}],
        plugins=["tests.support.plugins:block_loop_once"],
    )
    env = {"PYTHONPATH": str(ROOT), "EDGED_TEST_BLOCK_AT": "60", "EDGED_TEST_BLOCK_S": "3"}
    with DaemonProcess(path, tmp_path, watchdog_s=0.5, env=env) as daemon:
        daemon.wait_ready()
        daemon.wait_for(lambda: "event=blocking" in daemon.log(), 20, "the plug-in to block")
        daemon.wait_for(lambda: "event=unblocked" in daemon.log(), 20, "the plug-in to return")
        before = len(daemon.notified("WATCHDOG=1"))  # may all predate the block
        daemon.wait_for(
            lambda: len(daemon.notified("WATCHDOG=1")) >= before + 2, 5, "pings after the block"
        )
        times = [t for t, line in daemon.notifications if line == "WATCHDOG=1"]
        gaps = np.diff(times)
        assert gaps.max() >= 2.5  # silent while blocked
        assert np.median(gaps) < 0.5  # regular otherwise
        assert daemon.terminate() == 0


def test_a_wedged_sample_write_stops_the_watchdog(tmp_path, short_dir, digits) -> None:
    """Another process holds the sample store's write lock for 4 s: kept samples' writes
    wait, the post stage waits for a free write slot, inference waits behind it, and the
    pings stop for that long (they went on before: only a hung invoke stopped them); after
    the lock is released the pings resume and the daemon serves on."""
    import sqlite3

    bundle, data = digits
    path = config(
        tmp_path,
        short_dir,
        bundle,
        sources=[{"kind": "replay", "name": "digits", "path": str(data), "rate_hz": 100}],
        gating={"threshold": 0.999},
        pipeline={"max_pending_writes": 1},
    )
    with DaemonProcess(path, tmp_path, watchdog_s=1.0) as daemon:
        daemon.wait_ready()
        daemon.wait_for(lambda: daemon.status()["counts"]["kept"] > 0, 20, "a kept sample")
        store = sqlite3.connect(tmp_path / "state" / "samples.db", isolation_level=None)
        store.execute("BEGIN EXCLUSIVE")
        locked_at = time.monotonic()
        time.sleep(4.0)
        store.execute("ROLLBACK")
        store.close()
        released_at = time.monotonic()
        kept = daemon.status()["counts"]["kept"]
        daemon.wait_for(lambda: daemon.status()["counts"]["kept"] > kept, 20, "writes again")

        def pings() -> list[float]:
            return [t for t, line in daemon.notifications if line == "WATCHDOG=1"]

        daemon.wait_for(lambda: any(t > released_at for t in pings()), 10, "pings again")
        times = pings()
        during = [t for t in times if locked_at + 1.0 < t < released_at]
        gaps = np.diff([t for t in times if t > locked_at - 1.0])
        assert gaps.max() >= 2.5, gaps  # silent while the write was wedged
        assert len(during) <= 1, during
        assert daemon.terminate() == 0


def test_spool_files_are_removed_once_processed_and_bad_ones_set_aside(
    tmp_path, short_dir, digits
) -> None:
    """Dropped .npy and image files (one sample or a batch) are inferred and then deleted,
    from two spool sources at once; garbage, a broken JPEG and a wrong-shape file go to
    rejected/, are counted, and the daemon keeps serving."""
    from PIL import Image

    bundle, data = digits
    spool, other = tmp_path / "spool", tmp_path / "other"
    spool.mkdir()
    other.mkdir()
    x = np.load(data)["x"]
    path = config(
        tmp_path,
        short_dir,
        bundle,
        sources=[
            {"kind": "spool", "name": "drop", "path": str(spool), "poll_s": 0.05},
            {"kind": "spool", "name": "other", "path": str(other), "poll_s": 0.05},
        ],
    )
    picture = io.BytesIO()
    Image.fromarray(x[10, :, :, 0], "L").save(picture, format="PNG")
    with DaemonProcess(path, tmp_path) as daemon:
        daemon.wait_ready()
        (other / ".c.npy.tmp").write_bytes(npy(x[11]))
        (other / ".c.npy.tmp").rename(other / "c.npy")
        for name, payload in [
            ("a.npy", npy(x[0])),
            ("garbage.npy", b"\x93NUMPY not really"),
            ("batch.npy", npy(x[1:9])),
            ("shape.npy", npy(np.zeros((5, 5), np.uint8))),
            ("b.npy", npy(x[9])),
            ("c.png", picture.getvalue()),
            ("broken.jpg", b"\xff\xd8\xff\xe0 not a jpeg"),
        ]:
            (spool / f".{name}.tmp").write_bytes(payload)  # write, then rename: the contract
            (spool / f".{name}.tmp").rename(spool / name)
        daemon.wait_for(
            lambda: (
                sorted(p.name for p in spool.iterdir()) == ["rejected"]
                and len(list((spool / "rejected").iterdir())) == 3
                and sorted(p.name for p in other.iterdir()) == ["rejected"]
            ),
            20,
            "the spools to empty",
        )
        status = daemon.status()
        assert status["counts"]["inferred"] == 12
        assert status["bad_input"] == {"unreadable": 2, "wrong_shape": 1}
        assert sorted(p.name for p in (spool / "rejected").iterdir()) == [
            "broken.jpg",
            "garbage.npy",
            "shape.npy",
        ]
        assert daemon.terminate() == 0
    assert "kind=unreadable" in daemon.log()


def test_mqtt_source_results_and_garbage(tmp_path, short_dir, digits, mosquitto) -> None:
    """Samples published on a local topic come back as results on the results topic, in
    milliseconds, whatever the uplink does (here it points at a dead port); garbage and float
    samples for the uint8 model are counted and skipped."""
    bundle, data = digits
    x, y = np.load(data)["x"], np.load(data)["y"]
    topic = f"test/{tmp_path.name}/camera"
    results = f"test/{tmp_path.name}/results"
    path = config(
        tmp_path,
        short_dir,
        bundle,
        sources=[{"kind": "mqtt", "name": "camera", "topic": topic}],
        local_mqtt={"host": mosquitto.host, "port": mosquitto.port, "results_topic": results},
        uplink={"enabled": True, "host": "127.0.0.1", "port": 9},  # nothing listens there
    )
    with (
        DaemonProcess(path, tmp_path) as daemon,
        MqttSubscriber(mosquitto.host, mosquitto.port, results) as sub,
    ):
        daemon.wait_ready()
        daemon.wait_for(lambda: daemon.status()["local_bus"]["connected"], 10, "local bus")

        messages = [{"topic": topic, "payload": npy(x[i]), "qos": 1} for i in range(50)]
        messages.insert(10, {"topic": topic, "payload": b"\x00garbage", "qos": 1})
        messages.insert(20, {"topic": topic, "payload": npy(x[:4].astype(np.float32)), "qos": 1})
        publish.multiple(messages, hostname=mosquitto.host, port=mosquitto.port)
        sub.wait_for(lambda msgs: len(msgs) >= 50)
        decoded = [json.loads(m.payload) for m in sub.messages]
        assert all(r["source"] == "camera" for r in decoded)
        top1 = [r["top1"] for r in decoded if r["ref"] == topic]
        assert np.mean(np.asarray(top1[:10]) == y[:10]) >= 0.9
        assert np.median([r["latency_ms"] for r in decoded]) < 50
        status = daemon.status()
        assert status["bad_input"] == {"unreadable": 1, "wrong_dtype": 4}
        assert status["counts"]["inferred"] == 50
        assert status["uplink"]["state"] != "connected"
        assert daemon.terminate() == 0


def test_sighup_reloads_without_dropping_samples(tmp_path, short_dir, digits) -> None:
    """SIGHUP with a stricter threshold applies it in place (RELOADING=1 then READY=1) and
    every replayed sample is still processed once; a broken file on SIGHUP is refused with
    one sentence and the daemon keeps its old configuration."""
    bundle, data = digits
    sources = [{"kind": "replay", "name": "digits", "path": str(data), "rate_hz": 120}]
    path = config(tmp_path, short_dir, bundle, sources=sources)
    with DaemonProcess(path, tmp_path) as daemon:
        daemon.wait_ready()
        daemon.wait_for(lambda: daemon.status()["counts"]["inferred"] >= 60, 20, "samples")
        path.write_text(path.read_text() + "\n[gating]\nthreshold = 1.0\n")
        daemon.signal(signal.SIGHUP)
        daemon.wait_for(lambda: "event=reloaded" in daemon.log(), 10, "reload")
        assert daemon.notified("RELOADING=1")
        before = daemon.status()
        daemon.wait_for(lambda: daemon.status()["counts"]["inferred"] == 360, 20, "the end")
        after = daemon.status()
        # about 5 % are uncertain at the bundle's derived threshold; at 1.0 nearly all are
        # (an int8 model's softmax can round its surest answers to exactly 1.0)
        assert before["gating"]["uncertain"] < 0.2 * before["counts"]["inferred"]
        new = after["counts"]["inferred"] - before["counts"]["inferred"]
        assert after["gating"]["uncertain"] - before["gating"]["uncertain"] > 0.5 * new
        path.write_text(path.read_text() + "\n[pipeline]\nqueue_size = -1\n")
        daemon.signal(signal.SIGHUP)
        daemon.wait_for(lambda: "event=reload_refused" in daemon.log(), 10, "the refusal")
        assert "pipeline.queue_size: expected `int` >= 1" in daemon.log()
        assert daemon.status()["state"] == "running"
        assert after["counts"]["received"] == after["counts"]["inferred"] == 360
        assert daemon.terminate() == 0


def test_sigterm_drains_and_replay_resumes(tmp_path, short_dir, digits) -> None:
    """SIGTERM mid-stream exits 0 within the drain bound; the next start resumes the replay
    at its bookmark, so the two runs together process every sample."""
    bundle, data = digits
    sources = [{"kind": "replay", "name": "digits", "path": str(data), "rate_hz": 150}]
    path = config(tmp_path, short_dir, bundle, sources=sources)
    with DaemonProcess(path, tmp_path) as first:
        first.wait_ready()
        first.wait_for(lambda: first.status()["counts"]["inferred"] >= 100, 20, "samples")
        started = time.monotonic()
        assert first.terminate() == 0
        assert time.monotonic() - started < 10
    done_first = int(first.log().split("event=stopped inferred=")[1].split()[0])
    with DaemonProcess(path, tmp_path) as second:
        second.wait_ready()
        second.wait_for(lambda: "reached the end" in second.log(), 20, "the replay to finish")
        done_second = second.status()["counts"]["inferred"]
        assert second.terminate() == 0
    assert 100 <= done_first < 360
    assert done_first + done_second == 360


def test_check_config_explains_the_first_error(tmp_path) -> None:
    """`edged check-config` exits 2 with one sentence naming the key, and 0 on a valid file."""
    cases = {
        "[pipeline]\nqueue_size = 0\n": "pipeline.queue_size: expected `int` >= 1",
        "[drift]\nwindw = 3\n": "drift: unknown key `windw`",
        "[gating]\nscore = 'vibes'\n": "gating.score: invalid enum value 'vibes'",
        "[[source]]\nkind = 'usb'\nname = 'x'\n": "source[0].kind: invalid value 'usb'",
        "[[source]]\nkind = 'mqtt'\nname = 'cam'\ntopic = 'x'\n": "needs a [local_mqtt] section",
        "[device\n": "is not valid TOML",
    }
    for text, expected in cases.items():
        path = tmp_path / "bad.toml"
        path.write_text(text)
        result = subprocess.run(
            [sys.executable, "-m", "edged.cli", "check-config", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 2, text
        assert expected in result.stderr, (text, result.stderr)
        assert result.stderr.count("\n") == 1
    (tmp_path / "good.toml").write_text("[engine]\nthreads = 2\n")
    result = subprocess.run(
        [sys.executable, "-m", "edged.cli", "check-config", str(tmp_path / "good.toml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and "valid" in result.stdout


@pytest.mark.parametrize(
    ("gating", "expected"),
    [
        ({"per_class": {"cat": 0.5}}, "gating.per_class names 'cat', which is not a label"),
        ({"reference_quantile": 0.99}, "reference_quantile 0.99 is outside the bundle's"),
    ],
)
def test_gating_that_does_not_fit_the_model_is_one_sentence(
    tmp_path, short_dir, digits, gating, expected
) -> None:
    """A [gating] section valid on its own but not for the configured model: check-config
    names the model and the key, and `edged run` refuses at start the same way (exit 2, one
    line, no traceback) instead of crashing with a ValueError; without it, check-config
    says the section fits."""
    bundle, _ = digits
    path = config(tmp_path, short_dir, bundle, sources=[], gating=gating)
    for command in (["check-config", str(path)], ["run", "--config", str(path)]):
        result = subprocess.run(
            [sys.executable, "-m", "edged.cli", *command],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        assert result.returncode == 2, (command, result.stderr)
        last = result.stderr.strip().splitlines()[-1]
        assert "[gating] does not fit model" in last and expected in last, result.stderr
        assert "Traceback" not in result.stderr
    path = config(tmp_path, short_dir, bundle, sources=[])
    checked = subprocess.run(
        [sys.executable, "-m", "edged.cli", "check-config", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0 and "[gating] fits it" in checked.stdout, checked.stderr


def test_mqtt_backpressure_holds_messages_at_the_broker(
    tmp_path, short_dir, digits, mosquitto
) -> None:
    """600 QoS 1 samples published at once to a daemon that handles ~300/s: its queue stays
    within queue_size (the broker holds the rest, within Receive Maximum) and every sample
    comes out as a result; none is lost."""
    bundle, data = digits
    x = np.load(data)["x"]
    topic, results = f"test/{tmp_path.name}/in", f"test/{tmp_path.name}/out"
    path = config(
        tmp_path,
        short_dir,
        bundle,
        sources=[{"kind": "mqtt", "name": "flood", "topic": topic}],
        local_mqtt={"host": mosquitto.host, "port": mosquitto.port, "results_topic": results},
        pipeline={"queue_size": 16},
        plugins=["tests.support.plugins:slow_consumer"],
    )
    env = {"PYTHONPATH": str(ROOT), "EDGED_TEST_SLEEP_S": "0.003"}
    with (
        DaemonProcess(path, tmp_path, env=env) as daemon,
        MqttSubscriber(mosquitto.host, mosquitto.port, results, timeout=60) as sub,
    ):
        daemon.wait_ready()
        daemon.wait_for(lambda: daemon.status()["local_bus"]["connected"], 10, "local bus")
        messages = [{"topic": topic, "payload": npy(x[i % len(x)]), "qos": 1} for i in range(600)]
        publish.multiple(messages, hostname=mosquitto.host, port=mosquitto.port)
        depths = []
        while len(sub.messages) < 600:
            depths.append(daemon.status()["queue_depth"])
            sub.wait_for(lambda msgs: len(msgs) >= min(600, len(depths) * 20), 60)
        assert max(depths) <= 16
        assert max(depths) > 0  # the queue did fill: the input was faster
        assert daemon.status()["counts"]["inferred"] == 600
        assert daemon.terminate() == 0


@pytest.mark.parametrize("stop", ["sigterm", "kill -9"])
def test_mqtt_samples_survive_a_stop(tmp_path, short_dir, digits, mosquitto, stop) -> None:
    """Samples still queued at the broker or in the daemon when it stops (cleanly or by
    kill -9) are delivered again to the next start: every one gets a result."""
    bundle, data = digits
    x = np.load(data)["x"]
    base, results = f"test/{tmp_path.name}/{stop[:4]}", f"test/{tmp_path.name}/results"
    path = config(
        tmp_path,
        short_dir,
        bundle,
        sources=[{"kind": "mqtt", "name": "cams", "topic": f"{base}/+"}],
        local_mqtt={"host": mosquitto.host, "port": mosquitto.port, "results_topic": results},
        pipeline={"queue_size": 8},
        plugins=["tests.support.plugins:slow_consumer"],
    )
    env = {"PYTHONPATH": str(ROOT), "EDGED_TEST_SLEEP_S": "0.005"}
    with MqttSubscriber(mosquitto.host, mosquitto.port, results, timeout=60) as sub:
        with DaemonProcess(path, tmp_path, env=env) as first:
            first.wait_ready()
            first.wait_for(lambda: first.status()["local_bus"]["connected"], 10, "local bus")
            messages = [
                {"topic": f"{base}/{i}", "payload": npy(x[i % len(x)]), "qos": 1}
                for i in range(400)
            ]
            publish.multiple(messages, hostname=mosquitto.host, port=mosquitto.port)
            sub.wait_for(lambda msgs: len(msgs) >= 100)
            if stop == "sigterm":
                assert first.terminate() == 0
            else:
                first.kill()
        assert len(sub.messages) < 400  # stopped with work left at the broker
        with DaemonProcess(path, tmp_path, env=env) as second:
            second.wait_ready()
            refs = lambda msgs: {json.loads(m.payload)["ref"] for m in msgs}  # noqa: E731
            sub.wait_for(lambda msgs: len(refs(msgs)) == 400)
            assert second.terminate() == 0
    assert refs(sub.messages) == {f"{base}/{i}" for i in range(400)}
