"""Attacks on a real `edged run`: the repository simulator served over real HTTP (with the
device-update route), the daemon woken by a real MQTT `cmd/update`. After each attack the
daemon states the specific refusal, still serves 1.0.0, and its model slots and trusted
metadata are byte for byte what they were; at the end the honest update installs."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edged_formats import read_bundle, write_bundle
from edged_formats.tuf import (
    DAY,
    SigningKey,
    TargetFile,
    canonical_json,
    metadata_path,
    new_root,
    sign,
)
from tests.support.daemon import DaemonProcess, render_toml
from tests.support.tuf_simulator import RepositorySimulator, snapshot_tree

DEVICE = "dev-0123456789abcdef"
NEW = "models/digits/1.1.0.edb"


class Repository:
    """The simulator over HTTP: /v1/repository/<path> (Range answered), and the assignment."""

    def __init__(self, sim: RepositorySimulator) -> None:
        self.sim = sim
        self.assignment: dict[str, str] | None = None
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                if self.path == "/v1/device/self/update":
                    outer._assignment(self)
                elif self.path.startswith("/v1/repository/"):
                    outer._file(self, self.path.removeprefix("/v1/repository/"))
                else:
                    self.send_error(404)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def _assignment(self, handler: BaseHTTPRequestHandler) -> None:
        if self.assignment is None:
            handler.send_response(204)
            handler.end_headers()
            return
        body = json.dumps(self.assignment).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def _file(self, handler: BaseHTTPRequestHandler, path: str) -> None:
        if path in self.sim.stalled:
            time.sleep(3)
            return
        data = self.sim.files().get(path)
        if data is None:
            handler.send_error(404)
            return
        start = 0
        ranged = handler.headers.get("Range")
        if ranged:
            start = int(ranged.removeprefix("bytes=").rstrip("-"))
        handler.send_response(206 if start else 200)
        handler.send_header("Content-Length", str(len(data) - start))
        handler.end_headers()
        handler.wfile.write(data[start:])


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="edged-") as d:
        yield Path(d)


def enrolled_state(state: Path, repo: Repository, broker: Any) -> None:
    """What `edged enroll` leaves, pointing at the simulator and the test broker."""
    state.mkdir(parents=True)
    enrollment = {
        "url": repo.url,
        "device_id": DEVICE,
        "group": "lab",
        "tags": [],
        "broker_host": broker.host,
        "broker_port": broker.port,
        "broker_tls": False,
        "username": DEVICE,
    }
    (state / "enrollment.json").write_text(json.dumps(enrollment))
    (state / "uplink.password").write_text("unused")
    (state / "api.token").write_text("eddev_test")
    (state / "ota" / "metadata").mkdir(parents=True)
    (state / "ota" / "metadata" / "root.json").write_bytes(repo.sim.first_root)


def test_every_attack_is_refused_while_the_device_keeps_serving(  # noqa: PLR0915 - one story
    tmp_path: Path, short_dir: Path, broker: Any, tf_bundles: dict[str, Path], tf_reference
) -> None:
    """Tampered or oversized artifact, forged, replayed, expired or oversized metadata,
    mix-and-match snapshot, root rotation with the wrong keys, `..` names, a threshold reached
    by repeating one key, targets signed by the online keys alone, other hardware and a
    stalled server: each refused by name, nothing on disk changed; then 1.1.0 installs."""
    import numpy as np

    factory = tf_bundles["digits_int8_io_float"]
    parent = read_bundle(factory.read_bytes())
    child = write_bundle(dataclasses.replace(parent.manifest, version="1.1.0"), parent.members)
    # targets need two signatures: one online key, one kept by the release manager
    sim = RepositorySimulator(now=int(time.time()), thresholds={"targets": 2})
    sim.add_target("models/digits/1.0.0.edb", factory.read_bytes(), version="1.0.0")
    repo = Repository(sim)
    state = tmp_path / "state"
    enrolled_state(state, repo, broker)
    stream = tmp_path / "stream.npz"
    np.savez(stream, x=tf_reference["x"])
    config = tmp_path / "edged.toml"
    config.write_text(
        render_toml(
            {
                "device": {"state_dir": str(state), "model": str(factory)},
                "source": [
                    {
                        "kind": "replay",
                        "name": "d",
                        "path": str(stream),
                        "rate_hz": 50,
                        "loop": True,
                    }
                ],
                "update": {"poll_s": 600, "watch_s": 0, "timeout_s": 1},
                "outbox": {"min_free_mb": 0},
                "status": {"socket": str(short_dir / "status.sock")},
            }
        )
    )
    notifier = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    notifier.connect(broker.host, broker.port)
    notifier.loop_start()
    with DaemonProcess(config, tmp_path) as daemon:
        daemon.wait_ready()
        daemon.wait_for(lambda: daemon.status()["update"]["checks"] >= 1, 20, "the first check")
        time.sleep(0.5)  # the uplink subscribes to its commands

        def check(assignment: str) -> dict[str, Any]:
            version = sim.targets[assignment].version if assignment in sim.targets else "9"
            repo.assignment = {"rollout": "r1", "target": assignment, "version": str(version)}
            before = daemon.status()["update"]["checks"]
            notifier.publish(f"edged/v1/{DEVICE}/cmd/update", b'{"rollout": "r1"}', qos=1)
            daemon.wait_for(
                lambda: daemon.status()["update"]["checks"] > before, 30, f"a check of {assignment}"
            )
            return dict(daemon.status()["update"])

        def sync() -> None:
            """An honest refresh: the device's trusted floors catch up with the server."""
            assert sim.repo.targets is not None
            reason = check("models/digits/never.edb")["reason"]
            assert reason.endswith(f"not in targets v{sim.repo.targets.version}"), reason

        sim.add_target(NEW, child, version="1.1.0")
        other = sim.add_target("models/cam/1.0.0.edb", child, hardware=["jetson"])
        sync()
        old_timestamp = sim.files()[metadata_path("timestamp")]
        sim.repo.refresh_timestamp(sim.now)
        sync()
        served = f"targets/models/digits/{sim.targets[NEW].sha256}.1.1.0.edb"

        def override(path: str, data: bytes) -> None:
            sim.overrides[path] = data

        def forged_timestamp(**changes: Any) -> bytes:
            assert sim.repo.timestamp is not None
            return sign(dataclasses.replace(sim.repo.timestamp, **changes), sim.keys["timestamp"])

        def mixed_snapshot() -> None:
            sim.publish()  # a new timestamp names a new snapshot; serve another in its place
            snap = sim.repo.snapshot
            assert snap is not None
            other_snapshot = dataclasses.replace(snap, expires=snap.expires - 60)
            override(
                metadata_path("snapshot", snap.version), sign(other_snapshot, sim.keys["snapshot"])
            )

        def escaping_targets() -> None:
            assert sim.repo.targets is not None
            body = sim.repo.targets.to_dict()
            body["version"] += 1
            body["targets"]["models/../../etc/x"] = TargetFile("x", 3, "0" * 64).to_dict()
            signatures = [
                {"keyid": k.keyid, "sig": k.sign(canonical_json(body)).hex()}
                for k in sim.keys["targets"]
            ]
            data = canonical_json({"signed": body, "signatures": signatures})
            version = dataclasses.replace(sim.repo.targets, version=body["version"])
            sim.repo.sign_targets(version, data, sim.now)

        def evil_targets(signatures: Callable[[bytes], list[dict[str, str]]]) -> None:
            """A targets version listing a model nobody released, signed as `signatures` says."""
            assert sim.repo.targets is not None
            evil = TargetFile(NEW, len(child), hashlib.sha256(b"evil" + child).hexdigest())
            body = sim.repo.targets.to_dict()
            body["version"] += 1
            body["targets"][NEW] = evil.to_dict()
            data = canonical_json({"signed": body, "signatures": signatures(canonical_json(body))})
            version = dataclasses.replace(sim.repo.targets, version=body["version"])
            sim.repo.sign_targets(version, data, sim.now)  # snapshot, timestamp: online keys

        online = sim.keys["targets"][0]

        def one_key_twice(message: bytes) -> list[dict[str, str]]:
            signature = {"keyid": online.keyid, "sig": online.sign(message).hex()}
            return [signature, signature]

        def online_key_only(message: bytes) -> list[dict[str, str]]:
            return [{"keyid": online.keyid, "sig": online.sign(message).hex()}]

        def root_by_new_keys_only() -> None:
            new_keys = [SigningKey.generate()]
            root = new_root(2, sim.now + DAY, dict(sim.keys) | {"root": new_keys})
            override(metadata_path("root", 2), sign(root, new_keys))

        assert sim.repo.timestamp is not None
        attacks: list[tuple[str, Callable[[], None], str, str]] = [
            ("tampered artifact", lambda: override(served, b"X" + child[1:]), NEW, "sha256"),
            ("endless artifact", lambda: override(served, child + b"A" * 100_000), NEW, "longer"),
            (
                "unknown signer",
                lambda: override(
                    metadata_path("timestamp"),
                    sign(sim.repo.timestamp, [SigningKey.generate()]),  # type: ignore[arg-type]
                ),
                NEW,
                "0 valid signature",
            ),
            (
                "replayed timestamp",
                lambda: override(metadata_path("timestamp"), old_timestamp),
                NEW,
                "older than the trusted",
            ),
            (
                "expired timestamp",
                lambda: override(
                    metadata_path("timestamp"), forged_timestamp(version=99, expires=sim.now - DAY)
                ),
                NEW,
                "cannot update",
            ),
            ("mix and match", mixed_snapshot, NEW, "does not match the sha256"),
            (
                "oversized timestamp",
                lambda: override(metadata_path("timestamp"), b" " * 200_000),
                NEW,
                "longer than the 65536 bytes",
            ),
            ("root by new keys only", root_by_new_keys_only, NEW, "root v2 has 0 valid signature"),
            ("escaping name", escaping_targets, NEW, "not a safe relative path"),
            (
                "one key repeated",
                lambda: evil_targets(one_key_twice),
                NEW,
                "1 valid signature(s) from targets keys of root v1, needs 2",
            ),
            (
                "online keys alone",
                lambda: evil_targets(online_key_only),
                NEW,
                "1 valid signature(s) from targets keys of root v1, needs 2",
            ),
            ("stalled server", lambda: sim.stalled.add(metadata_path("timestamp")), NEW, "stalled"),
            ("other hardware", lambda: None, other.name, "for hardware ['jetson']"),
        ]
        for name, attack, assignment, reason in attacks:
            slots_before = snapshot_tree(state / "models")
            metadata_before = snapshot_tree(state / "ota" / "metadata")
            published = sim.repo.files()
            attack()
            outcome = check(assignment)
            assert outcome["last_check"] == "refused", (name, outcome)
            assert reason in (outcome["reason"] or ""), (name, outcome)
            assert daemon.status()["model"]["version"] == parent.manifest.version, name
            assert snapshot_tree(state / "models") == slots_before, name
            assert snapshot_tree(state / "ota" / "metadata") == metadata_before, name
            sim.overrides.clear()
            sim.stalled.clear()
            if sim.repo.files() != published:  # the attack published: an honest version on top
                sim.publish()
                sync()
        done = check(NEW)
        assert done["last_check"] == "committed", done
        assert daemon.status()["model"]["version"] == "1.1.0"
    notifier.loop_stop()
    notifier.disconnect()
